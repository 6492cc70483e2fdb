"""The segments prompt format on a tiny random Llama: the block mask keeps candidates apart,
scores do not depend on a candidate's place or its batch, prompts render each candidate's own
relations, and training learns a task only the segment content reveals, in fp32 and bf16."""

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from lkg_pipeline.core.llm.model import LETTERS
from lkg_pipeline.core.llm.prompts import (
    LEGACY_SEGMENT_QUESTION,
    PROMPT_COLUMNS,
    PromptConfig,
    PromptSettings,
    build_prompts,
)
from lkg_pipeline.core.llm.rank.scoring import (
    load_ranker,
    rank_prompts,
    score_prompts,
    trained_over,
)
from lkg_pipeline.core.llm.segments import (
    MIN_MATMUL_SPEEDUP,
    answer_token_ids,
    choose_attention,
    grouped_attention,
    grouped_attention_pays,
    grouped_sdpa,
    segment_batch,
    segment_scores,
    tokenize_segments,
)
from lkg_pipeline.core.llm.train.config import RunPaths, TrainConfig
from lkg_pipeline.core.llm.train.data import read_examples
from lkg_pipeline.core.llm.train.loop import training_function

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_base: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_base)


def segment(title: str) -> str:
    return f"\nCandidate: {title}\nIs it the movie they will watch next? Answer:"


PREFIX = "Judge each candidate.\n\nUser history:\n(1) Heat\n(2) Ronin"


def test_each_candidate_scores_as_if_it_followed_the_history_alone(tiny) -> None:
    model, tokenizer = tiny
    parts = [segment(f"film {i}") for i in range(6)]
    prompt = tokenize_segments(tokenizer, PREFIX, parts)
    answers = answer_token_ids(tokenizer, parts[0])
    with torch.no_grad():
        scores = segment_scores(model, segment_batch([prompt], 0), answers)[0]  # (6,)
        for c in range(6):
            alone = torch.tensor([prompt.prefix + prompt.segments[c]])
            logits = model(input_ids=alone).logits[0, -1]
            expected = logits[answers[0]] - logits[answers[1]]
            torch.testing.assert_close(scores[c], expected, rtol=1e-4, atol=1e-5)


def test_scores_follow_the_candidate_not_its_place_or_batch(tiny) -> None:
    model, tokenizer = tiny
    titles = [f"film {i}" for i in range(len(LETTERS))]
    order = list(reversed(range(len(LETTERS))))
    prefixes = [PREFIX, PREFIX + "\n(3) Alien", PREFIX]
    segments = [
        [segment(t) for t in titles],
        [segment(t) for t in titles],
        [segment(titles[i]) for i in order],
    ]
    single = torch.cat(
        [score_prompts(model, tokenizer, [p], 1, [s]) for p, s in zip(prefixes, segments)]
    )
    batched = score_prompts(model, tokenizer, prefixes, 3, segments)  # right-padded together
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(single[2], single[0][order], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(single[1], single[0])  # the history does reach every segment


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_windowed_attention_computes_what_the_dense_mask_computes(
    tiny, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, tolerance: float
) -> None:
    """Scores and gradients of `segment_attention` (several windows, rows with different
    prefix and segment lengths) equal those of SDPA under the dense block mask."""
    import copy

    import lkg_pipeline.core.llm.segments as segments

    monkeypatch.setattr(segments, "WINDOW_TOKENS", 40)  # several windows on short prompts
    model, tokenizer = tiny
    dense = copy.deepcopy(model).to(dtype)
    windowed = segments.use_segment_attention(copy.deepcopy(model)).to(dtype)
    parts = [
        [segment(f"film {i}" + " sequel" * (7 * i % 5)) for i in range(len(LETTERS))],
        [segment(f"movie {i}" + " remake" * (3 * i % 4)) for i in range(len(LETTERS))],
    ]
    prompts = [
        tokenize_segments(tokenizer, PREFIX, parts[0]),
        tokenize_segments(tokenizer, PREFIX + "\n(3) Alien\n(4) The Thing", parts[1]),
    ]
    answers = answer_token_ids(tokenizer, parts[0][0])
    batch = segment_batch(prompts, 0)
    assert len(batch["segment_windows"]) >= 4
    without = {k: v for k, v in batch.items() if not k.startswith("segment_")}
    expected = segment_scores(dense, without, answers)  # (2, 20)
    ours = segment_scores(windowed, batch, answers)
    torch.testing.assert_close(ours, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(  # a row scores the same alone as beside a longer one
        segment_scores(windowed, segment_batch(prompts[:1], 0), answers), ours[:1],
        rtol=tolerance, atol=tolerance,
    )  # fmt: skip
    expected.square().sum().backward()
    ours.square().sum().backward()
    for (name, a), b in zip(dense.named_parameters(), windowed.parameters(), strict=True):
        scale = a.grad.abs().max().clamp_min(1e-12)
        assert (a.grad - b.grad).abs().max() / scale < tolerance, name
    # calls without windows (letter prompts, generation) are transformers' own SDPA
    ids = torch.tensor([prompts[1].prefix])
    with torch.no_grad():
        torch.testing.assert_close(windowed(input_ids=ids).logits, dense(input_ids=ids).logits)


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_attention_matches_the_sdpa_kernel(causal: bool) -> None:
    """The matmul path (bf16 training on CPU) computes SDPA's attention, values and the
    gradients of query, key and value, with grouped key heads and an additive mask."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, n_queries, n_keys, dim = 2, 6, 2, 5, 5 if causal else 9, 8
    query, key, value = (
        torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
        for shape in [
            (batch, heads, n_queries, dim),
            (batch, kv_heads, n_keys, dim),
            (batch, kv_heads, n_keys, dim),
        ]
    )
    mask = None
    if not causal:  # each query sees a different set of keys, as a window's segments do
        allowed = torch.rand((batch, 1, n_queries, n_keys), generator=generator) < 0.6
        allowed[..., 0] = True  # no empty row
        mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(
            ~allowed, torch.finfo(torch.float64).min
        )
    outputs, gradients = [], []
    for attend in (grouped_sdpa, grouped_attention):
        out = attend(query, key, value, mask, 0.0, 0.3, causal=causal)
        assert out.shape == (batch, n_queries, heads, dim)
        outputs.append(out)
        gradients.append(torch.autograd.grad(out.sin().sum(), (query, key, value)))
    # fp64, to fp32's tolerance: torch's CPU kernel is not exact to fp64 (~1e-7 here)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(gradients[1], gradients[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_attention_in_bf16_keeps_to_the_fp32_kernel(causal: bool) -> None:
    """In bf16 the score passes run in place in bf16 (scale folded into the queries, mask
    added in place, softmax written in bf16): values and gradients stay within bf16 rounding
    of the fp32 kernel's, with a scale that is not a power of two too, and no input changes."""
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads, n_queries, dim = 6, 2, 48, 16
    n_keys = n_queries if causal else 80
    shapes = [(1, heads, n_queries, dim), (1, kv_heads, n_keys, dim), (1, kv_heads, n_keys, dim)]
    inputs = [torch.randn(shape, generator=generator) * 2 for shape in shapes]
    mask = None
    if not causal:
        allowed = torch.rand((1, 1, n_queries, n_keys), generator=generator) < 0.5
        allowed[..., 0] = True
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    upstream = torch.randn((1, n_queries, heads, dim), generator=generator)
    for scaling in (None, 0.3):
        results = []
        for attend, dtype in ((grouped_sdpa, torch.float32), (grouped_attention, torch.bfloat16)):
            leaves = [t.clone().to(dtype).requires_grad_() for t in inputs]
            typed_mask = None if mask is None else mask.to(dtype)
            kept = [t.detach().clone() for t in leaves]
            out = attend(*leaves, typed_mask, 0.0, scaling, causal=causal)
            (out.float() * upstream).sum().backward()
            assert all(torch.equal(a, b) for a, b in zip(leaves, kept, strict=True))
            if typed_mask is not None:
                assert torch.equal(typed_mask, mask.to(dtype))
            results.append([out, *(t.grad for t in leaves)])
        for theirs, ours in zip(*results, strict=True):
            cosine = torch.nn.functional.cosine_similarity(
                ours.float().flatten(), theirs.flatten(), dim=0
            )
            assert cosine > 0.999, (scaling, cosine)


def test_grouped_attention_serves_bf16_on_cpu() -> None:
    def query(dtype: torch.dtype, grad: bool) -> torch.Tensor:
        return torch.zeros(1, 2, 3, 4, dtype=dtype, requires_grad=grad)

    assert grouped_attention_pays(query(torch.bfloat16, True))  # training
    assert grouped_attention_pays(query(torch.bfloat16, False))  # ranking
    with torch.inference_mode():
        assert grouped_attention_pays(query(torch.bfloat16, False))
    assert not grouped_attention_pays(query(torch.float32, True))  # fp32: the kernel
    assert not grouped_attention_pays(query(torch.float32, False))
    assert not grouped_attention_pays(query(torch.float16, True))  # not measured


def test_the_attention_path_is_measured_on_cpu_and_forced_by_name(tiny) -> None:
    import copy
    from unittest import mock

    from transformers import AutoConfig

    import lkg_pipeline.core.llm.segments as segments

    model, tokenizer = tiny
    config = model.config
    smol = AutoConfig.for_model("llama", num_attention_heads=9, num_key_value_heads=3,
                                hidden_size=576)  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        for backward in (False, True):
            choice = choose_attention("auto", dtype, "cpu", smol, backward)
            assert choice.kernel_ms > 0 and choice.matmul_ms > 0
            faster = choice.kernel_ms / choice.matmul_ms >= MIN_MATMUL_SPEEDUP
            assert choice.chosen == ("matmul" if faster else "kernel"), choice
            assert "kernel" in choice.reason and choice.metadata()["attention_chosen"]
    assert choose_attention("matmul", torch.float32, "cpu", config, False).chosen == "matmul"
    assert choose_attention("auto", torch.bfloat16, "cuda:0", config, True).chosen == "kernel"
    with pytest.raises(ValueError, match="unknown attention"):
        choose_attention("flash", torch.float32, "cpu", config, False)

    # the chosen path is the one the windows take, and both score alike
    parts = [segment(f"film {i}") for i in range(6)]
    batch = segment_batch([tokenize_segments(tokenizer, PREFIX, parts)], 0)
    answers = answer_token_ids(tokenizer, parts[0])
    scores = {}
    for path in ("kernel", "matmul"):
        windowed = segments.use_segment_attention(copy.deepcopy(model), path)
        with (
            mock.patch.object(segments, "grouped_attention", wraps=grouped_attention) as matmul,
            torch.no_grad(),
        ):
            scores[path] = segment_scores(windowed, batch, answers)
        assert matmul.called == (path == "matmul")
    torch.testing.assert_close(scores["kernel"], scores["matmul"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="attention path"):
        segments.use_segment_attention(model, "auto")


def test_segments_render_each_candidate_with_its_own_relations() -> None:
    examples = pl.DataFrame(
        {
            "example_id": [0],
            "user_idx": [0],
            "split": ["test"],
            "prefix_len": [3],
            "target_item_idx": [12],
            "candidate_item_idxs": [[10 + c for c in range(len(LETTERS))]],
        }
    )
    sequences = pl.DataFrame({"user_idx": [0] * 3, "position": [0, 1, 2], "item_idx": [1, 2, 3]})
    titles = {i: f"title {i}" for i in range(40)}
    selected = pl.DataFrame(
        {
            "example_id": [0, 0],
            "variant": ["lkg_rag"] * 2,
            "selection_rank": [1, 2],
            "history_item_idx": [2, 3],
            "candidate_item_idx": [12, 12],
            "relations": [["has_genre", "genre_of"], ["co_rated"]],
            "via_name": ["Comedy", None],
        }
    )
    config = PromptConfig(format="segments", max_prompt_tokens=4096)
    table = build_prompts(
        examples, sequences, titles, selected, "lkg_rag", config, lambda t: len(t.split())
    )
    assert dict(table.schema) == PROMPT_COLUMNS
    row = table.row(0, named=True)
    assert row["prompt"].endswith("User history:\n(1) title 1\n(2) title 2\n(3) title 3")
    assert len(row["segments"]) == len(LETTERS) and row["target_index"] == 2
    assert row["segments"][2] == (
        "\nCandidate: title 12\nRelations: (2) both Comedy; (3) often rated by the same people"
        "\nAnswer:"
    )
    assert all("Relations" not in s for i, s in enumerate(row["segments"]) if i != 2)
    assert row["n_tokens"] == len(row["prompt"].split()) + sum(
        len(s.split()) for s in row["segments"]
    )
    letters = build_prompts(
        examples, sequences, titles, selected, "lkg_rag", PromptConfig(), lambda t: 1
    )
    assert letters["segments"].to_list() == [None]  # the letter format has no segments
    with pytest.raises(ValueError, match="unknown prompt format"):
        PromptConfig(format="pointwise")
    asked = replace(config, segment_question="Would they {verb} this {noun}? Answer:")
    table = build_prompts(examples, sequences, titles, selected, "lkg_rag", asked, len)
    assert all(s.endswith("\nWould they watch this movie? Answer:") for s in table["segments"][0])
    for wrong in ("Is it {title}? Answer:", " "):
        with pytest.raises(ValueError, match="segment_question"):
            PromptConfig(format="segments", segment_question=wrong)


def test_prompt_settings_without_a_segment_question_read_as_the_old_one() -> None:
    """Prompts files (and the adapters trained on them) made before the question was a
    setting ended every segment in it: `recommendations` must render theirs the same way."""
    old = json.loads(PromptSettings(PromptConfig(format="segments")).to_json())
    del old["prompt"]["segment_question"]
    read = PromptSettings.from_dict(old)
    assert read.prompt.segment_question == LEGACY_SEGMENT_QUESTION
    assert read.prompt == replace(
        PromptConfig(format="segments"), segment_question=read.prompt.segment_question
    )
    assert PromptSettings.from_dict(json.loads(PromptSettings(read.prompt).to_json())) == read


def marked_prompts(n_train: int = 24, n_val: int = 8, seed: int = 0) -> pl.DataFrame:
    """A task only the segments reveal: the true candidate's title says "gold", at a random
    place among the 20, so neither a position nor the history can solve it."""
    rng = random.Random(seed)
    rows = []
    for i, split in enumerate(["train"] * n_train + ["val"] * n_val):
        target = rng.randrange(len(LETTERS))
        segments = [
            segment(f"item {rng.randint(1, 500)}" + (" gold" if c == target else ""))
            for c in range(len(LETTERS))
        ]
        rows.append(
            {
                "example_id": i,
                "user_idx": i,
                "split": split,
                "variant": "llamarec",
                "prompt": f"History:\n(1) item {rng.randint(1, 500)}",
                "candidate_item_idxs": rng.sample(range(1, 500), len(LETTERS)),
                "target_index": target,
                "n_tokens": 0,
                "segments": segments,
            }
        )
    return pl.DataFrame(rows, schema=PROMPT_COLUMNS)


def marked_training(**overrides: Any) -> TrainConfig:
    """Settings that learn the marked task in seconds on the tiny model."""
    settings: dict[str, Any] = {
        "lr": 2e-2,
        "warmup_steps": 0,
        "epochs": 4,
        "batch_size": 2,
        "grad_accum": 2,
        "eval_every": 1000,
        "log_every": 1,
        "max_val_examples": None,
        "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"),
    }
    return TrainConfig(**(settings | overrides))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_on_segments_learns_in_both_dtypes(
    tiny_base: Path, tmp_path: Path, dtype: str
) -> None:
    prompts = tmp_path / "prompts.parquet"
    marked_prompts().write_parquet(prompts)
    config = marked_training(dtype=dtype)
    result = training_function(config, RunPaths(prompts, tiny_base, tmp_path / "adapter"))
    val = {h["step"]: h["val"] for h in result.history if "val" in h}
    first, last = val[0], val[result.step]
    assert last["NDCG@10"] > first["NDCG@10"] + 0.2, val
    assert result.summary["precision"]["dtype_chosen"] == dtype
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}  # fp32 in both types

    # rankings (merged adapter) agree with the scores training validated with
    table = pl.read_parquet(prompts).filter(pl.col("split") == "val")
    model = load_ranker(tiny_base, tmp_path / "adapter", "cpu", getattr(torch, dtype))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    ranked = rank_prompts(model, tokenizer, table)
    ranks = ranked["target_rank"].cast(pl.Float64).to_numpy()
    val_examples = read_examples(prompts, "val", None, seed=0)
    assert len(ranks) == len(val_examples.prompts)
    # bf16: the adapter is folded into widened GEMMs (merged into bf16 weights most of the
    # update would round away), so ranking computes what validation computed
    assert np.mean(1.0 / np.log2(ranks + 1) * (ranks <= 10)) == pytest.approx(
        last["NDCG@10"], abs=1e-6
    )
    from lkg_pipeline.core.llm.lowrank import FoldedLoraLinear

    folded = [m for m in model.modules() if isinstance(m, FoldedLoraLinear)]
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert len(folded) == (0 if dtype == "float32" else 2 * len(config.target_modules))


def test_segments_trained_over_the_retriever_rank_as_they_were_validated(
    tiny_base: Path, tmp_path: Path
) -> None:
    """retriever_prior in the segments format: training lifts the fused ranking, and the
    rankings of the published adapter (read as trained over the retriever) compute exactly
    what training validated."""
    frame = marked_prompts()
    rng = np.random.default_rng(1)
    noise = rng.normal(scale=1.0, size=(frame.height, len(LETTERS)))  # a weak, noisy retriever
    prompts = tmp_path / "prompts.parquet"
    frame.with_columns(
        retriever_scores=pl.Series(noise.tolist(), dtype=pl.List(pl.Float32))
    ).write_parquet(prompts)
    config = marked_training(dtype="float32", retriever_prior=True)
    result = training_function(config, RunPaths(prompts, tiny_base, tmp_path / "adapter"))
    val = {h["step"]: h["val"] for h in result.history if "val" in h}
    assert val[result.step]["NDCG@10"] > val[0]["NDCG@10"] + 0.2, val
    adapter = tmp_path / "adapter"
    assert trained_over(adapter)
    from transformers import AutoTokenizer

    table = pl.read_parquet(prompts).filter(pl.col("split") == "val")
    model = load_ranker(tiny_base, adapter, "cpu", torch.float32)
    ranked = rank_prompts(
        model, AutoTokenizer.from_pretrained(tiny_base), table, retriever_prior=True
    )
    ranks = ranked["target_rank"].cast(pl.Float64).to_numpy()
    best = result.best_val["NDCG@10"]
    assert np.mean(1.0 / np.log2(ranks + 1) * (ranks <= 10)) == pytest.approx(best, abs=1e-6)
