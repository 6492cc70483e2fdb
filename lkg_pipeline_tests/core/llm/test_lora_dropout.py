"""LoRA dropout from random words: the rate, scale and gradient of nn.Dropout, the same masks
from the same seed, and swapped into a peft model only where peft put a dropout."""

from pathlib import Path

import pytest
import torch

from lkg_pipeline.core.llm.train.lora_dropout import WordDropout, use_word_dropout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.05, 0.3])
def test_word_dropout_drops_at_rate_p_and_keeps_the_expectation(
    dtype: torch.dtype, p: float
) -> None:
    torch.manual_seed(0)
    x = torch.ones(1000, 999, dtype=dtype, requires_grad=True)  # an odd count of elements
    out = WordDropout(p).train()(x)
    dropped = (out == 0).double().mean().item()
    assert dropped == pytest.approx(p, abs=0.002)  # 1M draws: the sd is ~0.0005 at p = 0.3
    kept = out[out != 0].double()
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-2)  # bf16 rounding
    assert out.double().mean().item() == pytest.approx(1.0, abs=0.01)
    out.sum().backward()  # the gradient passes where the mask kept, scaled as the value is
    torch.testing.assert_close(x.grad, out.detach())
    for column in (0, 500, 998):  # the mask covers every element, not a repeated slice
        assert 0 < (out[:, column] == 0).sum() < 1000


def test_word_dropout_is_seeded_and_off_outside_training() -> None:
    x = torch.randn(64, 33)
    dropout = WordDropout(0.5).train()
    torch.manual_seed(3)
    first = dropout(x)
    torch.manual_seed(3)
    torch.testing.assert_close(dropout(x), first, rtol=0, atol=0)
    assert not torch.equal(dropout(x), first)  # the next draw differs
    assert dropout.eval()(x) is x
    assert WordDropout(0.0).train()(x) is x
    assert torch.equal(WordDropout(1.0).train()(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        WordDropout(1.5)


@pytest.mark.parametrize("p", [0.05, 0.0])
def test_peft_lora_dropouts_are_swapped_and_training_still_learns(
    tiny_base: Path, p: float
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    n_layers = model.get_base_model().config.num_hidden_layers
    assert use_word_dropout(model) == (2 * n_layers if p else 0)
    dicts = [m.lora_dropout for m in model.modules() if hasattr(m, "lora_dropout")]
    kinds = {type(dropout) for d in dicts for dropout in d.values()}
    assert kinds == ({WordDropout} if p else {torch.nn.Identity})
    # a few optimizer steps through the swapped modules lower the loss on a fixed batch
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000, 77, 12, 640, 3]])
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
