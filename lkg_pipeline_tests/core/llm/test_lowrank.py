"""Folding a LoRA adapter for bf16 inference on a tiny random Llama: the folded layer is the
adapted layer's function, the bf16 model keeps the adapter's effect, and what it cannot fold
it leaves to peft."""

from pathlib import Path
from typing import Any

import pytest
import torch

from lkg_pipeline.core.llm.lowrank import FoldedLoraLinear, fold_lora, folded

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(base: Path, dtype: torch.dtype, **lora: Any) -> Any:
    """The tiny model with a LoRA adapter whose update is ~1% of the weights (as a trained
    one): LoRA B drawn at random instead of zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, **lora)
    model = get_peft_model(model, config, autocast_adapter_dtype=True)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.01)
    return model.eval()


def hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        return inner.get_decoder()(input_ids=ids).last_hidden_state.double()


IDS = torch.tensor([[5, 17, 300, 42, 9, 1000, 77, 12, 640, 3]])


def test_a_folded_layer_is_the_adapted_layer(tiny_base: Path) -> None:
    model = adapted(tiny_base, torch.float32)
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    x = torch.randn(3, 7, layer.in_features)
    with torch.no_grad():
        expected = layer(x)
        folded = fold_lora(model)  # replaces every adapted layer in place
        ours = folded.model.layers[0].mlp.up_proj(x)
    assert isinstance(folded.model.layers[0].mlp.up_proj, FoldedLoraLinear)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert not any("lora_" in name for name, _ in folded.named_parameters())


def test_bf16_folding_keeps_the_adapter_as_pefts_branch_does(tiny_base: Path) -> None:
    """Against the fp32 adapted model, the folded bf16 model is as close as peft's fp32
    branch over a bf16 base (what ranking computed before), and the adapter's effect on the
    hidden states survives to a few percent, far above bf16's own noise."""
    from transformers import AutoModelForCausalLM

    reference = hidden(adapted(tiny_base, torch.float32).merge_and_unload(), IDS)
    plain32 = hidden(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), IDS)
    plain16 = hidden(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16), IDS)
    branch = hidden(adapted(tiny_base, torch.bfloat16), IDS)
    folded = hidden(fold_lora(adapted(tiny_base, torch.bfloat16)), IDS)
    effect = reference - plain32  # what the adapter changes, in fp32
    noise = (plain16 - plain32).abs().mean()  # what bf16 changes without an adapter
    assert effect.abs().mean() > 10 * noise, "the adapter should matter"
    assert (folded - reference).abs().mean() < 1.5 * (branch - reference).abs().mean()
    kept = ((folded - plain16) - effect).abs().mean() / effect.abs().mean()
    assert kept < 0.1, f"the folded adapter's effect is off by {kept:.1%}"


def test_what_cannot_be_folded_stays_peft(tiny_base: Path) -> None:
    from peft import PeftModel

    model = adapted(tiny_base, torch.bfloat16, use_dora=True)
    assert isinstance(fold_lora(model), PeftModel)


def test_folded_scores_as_fold_lora_and_puts_the_peft_layers_back(tiny_base: Path) -> None:
    """Validation in the middle of training folds the adapter for a while: inside, the model
    computes what `fold_lora` computes; after it (even after an error) the peft layers and
    their trainable fp32 weights are back, so training goes on where it was."""
    from peft.tuners.lora import Linear as LoraLinear

    model = adapted(tiny_base, torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    with folded(model) as scorer:
        inside = hidden(scorer, IDS)
        assert isinstance(scorer.model.layers[0].mlp.up_proj, FoldedLoraLinear)
    assert {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)} == layers
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert sum(p.requires_grad for p in model.parameters()) == len(layers) * 2
    with pytest.raises(RuntimeError, match="stop"), folded(model):
        raise RuntimeError("stop")
    assert {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)} == layers
    torch.testing.assert_close(inside, hidden(fold_lora(model), IDS), rtol=0, atol=0)


def test_folded_leaves_what_it_cannot_fold(tiny_base: Path) -> None:
    model = adapted(tiny_base, torch.bfloat16, use_dora=True)
    with folded(model) as scorer:
        assert scorer is model
