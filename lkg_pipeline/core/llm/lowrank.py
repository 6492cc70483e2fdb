"""A LoRA adapter at the speed of a bf16 base model, without rounding the adapter away.

In fp32 the adapter is merged (`merge_and_unload`): B·A is folded into each weight once. In
bf16 that loses it: an update about 1e-3 of a weight's size is mostly below bf16's 8-bit
mantissa. peft's unmerged branch keeps it, but over a bf16 base with fp32 LoRA weights every
adapted layer casts its input to fp32, runs two thin fp32 GEMMs, adds in fp32 and casts back:
on SmolLM2-135M (LoRA on all seven linear layers, 1,030-token prompts, 2 cores) that made a
bf16 ranking forward ~2× slower than the base model's, most of the gain over fp32 gone.

Folded, each adapted Linear computes one GEMM with r more inner columns:

    y = [x, x·Aᵀ] · [W, s·B]ᵀ (+ bias)

The base product and the update are summed in the kernel's fp32 accumulator and rounded to
the compute type once, as the base layer's own output is; only A, s·B and x·Aᵀ are stored in
bf16, so the update keeps bf16's relative precision of the update itself, not of W. On one
layer of SmolLM2's shape it takes 0.86 ms against 0.72 ms for the base GEMM alone and 6.7 ms
for peft's fp32 branch, and lands closer to the fp32 result than that branch (what it buys a
ranking: `make bench-dtype`'s ablation, benchmarks/README.md#fp32-and-bf16).

For inference only (ranking, recommendations, and the training script's validation through
`folded`, which puts the peft layers back afterwards): training keeps peft's branch, whose fp32
master weights take the gradients. Hand-written because peft offers merging or the branch,
not this folded form.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F


class FoldedLoraLinear(torch.nn.Module):
    """`nn.Linear` plus a LoRA update, as one GEMM over the input widened by its projection."""

    def __init__(self, weight: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        # (out, in + r): the base weight beside the scaled up-projection
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.down = torch.nn.Parameter(down, requires_grad=False)  # (r, in): A
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.cat([x, F.linear(x, self.down)], dim=-1), self.weight, self.bias)


def foldable(module: Any) -> bool:
    """Whether a peft LoRA Linear is plain LoRA (no DoRA or other variant, no LoRA bias, not
    merged, nn.Linear weight layout): what `fold_lora` can fold exactly."""
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    return (
        bool(adapters)
        and not module.merged
        and not module.disable_adapters
        and not module.fan_in_fan_out
        and isinstance(module.get_base_layer(), torch.nn.Linear)
        and not any(a in module.lora_variant or module.lora_bias.get(a) for a in adapters)
    )


def fold_linear(module: Any) -> FoldedLoraLinear:
    """The folded form of one peft LoRA Linear (every active adapter, summed)."""
    base = module.get_base_layer()
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    dtype = base.weight.dtype
    down = torch.cat([module.lora_A[a].weight.float() for a in adapters], dim=0)  # (R, in)
    up = torch.cat(
        [module.lora_B[a].weight.float() * module.scaling[a] for a in adapters], dim=1
    )  # (out, R)
    weight = torch.cat([base.weight.detach(), up.to(dtype)], dim=1).contiguous()
    bias = None if base.bias is None else base.bias.detach()
    return FoldedLoraLinear(weight, down.to(dtype).contiguous(), bias)


def _adapted(model: Any) -> list[tuple[str, Any]] | None:
    """(name, layer) of every peft LoRA Linear inside `model`, when all of them can be folded;
    None when there are none or one cannot be (DoRA, LoRA bias, merged, …)."""
    from peft.tuners.lora import Linear as LoraLinear

    inner = model.get_base_model()
    adapted = [(n, m) for n, m in inner.named_modules() if isinstance(m, LoraLinear)]
    return adapted if adapted and all(foldable(m) for _, m in adapted) else None


def replace_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put `module` where `root.get_submodule(name)` is."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def fold_lora(model: Any) -> Any:
    """The transformers model inside a peft LoRA `model`, every adapted Linear folded.

    An adapter with a layer `foldable` rejects (DoRA, LoRA bias, …) is returned unchanged,
    as peft's branch computes it: slower, never wrong.
    """
    adapted = _adapted(model)
    if adapted is None:
        return model
    inner = model.get_base_model()
    for name, module in adapted:
        replace_submodule(inner, name, fold_linear(module))
    return inner


@contextlib.contextmanager
def folded(model: Any) -> Iterator[Any]:
    """`fold_lora` for a while: the folded transformers model inside the block, the peft layers
    (and their fp32 trainable weights, untouched) back in place after it, even on an error.
    For scoring in the middle of training; a model it cannot fold is yielded as it is."""
    adapted = _adapted(model)
    if adapted is None:
        yield model
        return
    inner = model.get_base_model()
    try:
        for name, module in adapted:
            replace_submodule(inner, name, fold_linear(module))
        yield inner
    finally:
        for name, module in adapted:
            replace_submodule(inner, name, module)
