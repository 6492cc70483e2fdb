"""The ranker at inference on a tiny random Llama: orders, ranks, and the same rankings after the
adapter is saved and loaded again (merged), whatever the batch size."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from lkg_pipeline.core.llm.model import LETTERS
from lkg_pipeline.core.llm.rank.scoring import (
    RANKING_COLUMNS,
    ProgressLog,
    load_ranker,
    rank_prompts,
    score_prompts,
    trained_over,
)
from lkg_pipeline_tests.core.tiny_llm import prompt_table

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_an_adapter_trained_over_the_retriever_ranks_by_prior_plus_llm(
    tiny_with_adapter, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    base, adapter, _ = tiny_with_adapter
    model = load_ranker(base, adapter, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(base)
    rng = np.random.default_rng(0)
    retriever = rng.normal(scale=3.0, size=(9, len(LETTERS)))
    retriever[2, 5] = -np.inf  # an item the retriever masked
    prompts = prompt_table().with_columns(
        retriever_scores=pl.Series(retriever.tolist(), dtype=pl.List(pl.Float32))
    )
    table = rank_prompts(model, tokenizer, prompts, retriever_prior=True)
    llm = score_prompts(model, tokenizer, prompts["prompt"].to_list(), 1).double()
    shifted = np.where(np.isfinite(retriever), retriever, -np.inf)
    lowest = np.where(np.isfinite(shifted), shifted, np.inf).min(axis=1, keepdims=True)
    shifted = np.where(np.isfinite(shifted), shifted, lowest).astype(np.float32)
    log_prior = torch.log_softmax(torch.tensor(shifted, dtype=torch.float64), dim=1)
    expected = llm + log_prior  # by hand: the prior a masked item gets is its row's lowest
    for row, s, candidates in zip(
        table.iter_rows(named=True), expected, prompts["candidate_item_idxs"], strict=True
    ):
        order = torch.sort(s.float(), descending=True, stable=True).indices.tolist()
        assert row["ranked_item_idxs"] == [candidates[i] for i in order]
        assert row["ranked_scores"] == pytest.approx(sorted(s.tolist(), reverse=True), abs=1e-4)
    alone = rank_prompts(model, tokenizer, prompts)  # the same model, LLM scores only
    assert alone["ranked_item_idxs"].to_list() != table["ranked_item_idxs"].to_list()
    with pytest.raises(ValueError, match="9 of 9 prompts have no retriever scores"):
        rank_prompts(model, tokenizer, prompt_table(), retriever_prior=True)

    assert not trained_over(None)
    for flag in (True, False):
        folder = tmp_path / str(flag)
        folder.mkdir()
        (folder / "training.json").write_text(json.dumps({"config": {"retriever_prior": flag}}))
        assert trained_over(folder) is flag
    (tmp_path / "old").mkdir()  # an adapter trained before the setting existed
    (tmp_path / "old" / "training.json").write_text(json.dumps({"config": {"lr": 1e-4}}))
    assert not trained_over(tmp_path / "old")


def without_time(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop("seconds")


def test_rankings_order_candidates_by_letter_logit(tiny_with_adapter) -> None:
    base, adapter, _ = tiny_with_adapter
    model = load_ranker(base, adapter, device="cpu")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = prompt_table()
    lines: list[str] = []
    progress = ProgressLog("rankings test", prompts.height, lines.append, every=0.5)
    table = rank_prompts(model, tokenizer, prompts, batch_size=1, progress=progress)
    assert dict(table.schema) == RANKING_COLUMNS
    n = prompts.height
    assert len(lines) == 2 and lines[-1].startswith(f"rankings test: {n}/{n} prompts (100%)")
    assert "prompts/s, ETA 0.0 min" in lines[-1]
    scores = score_prompts(model, tokenizer, prompts["prompt"].to_list(), 1)  # (N, 20)
    for row, s, candidates in zip(
        table.iter_rows(named=True), scores, prompts["candidate_item_idxs"], strict=True
    ):
        order = torch.sort(s, descending=True, stable=True).indices.tolist()
        assert row["ranked_item_idxs"] == [candidates[i] for i in order]
        assert row["ranked_scores"] == pytest.approx(sorted(s.tolist(), reverse=True))
    first = table.row(0, named=True)
    assert first["target_rank"] is None and first["target_item_idx"] is None  # not a candidate
    for row, target in zip(table.rows(named=True)[1:], prompts["target_index"][1:]):
        assert row["ranked_item_idxs"][row["target_rank"] - 1] == row["target_item_idx"]
        assert row["target_item_idx"] == 100 * row["example_id"] + target
    assert (table["seconds"] > 0).all() and (table["n_tokens"] > 50).all()


def test_rankings_are_identical_after_save_and_reload(tiny_with_adapter) -> None:
    from transformers import AutoTokenizer

    base, adapter, in_memory = tiny_with_adapter
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = prompt_table()
    once = rank_prompts(load_ranker(base, adapter, device="cpu"), tokenizer, prompts)
    again = rank_prompts(load_ranker(base, adapter, device="cpu"), tokenizer, prompts)
    assert without_time(once).equals(without_time(again))  # bit for bit
    batched = rank_prompts(load_ranker(base, adapter, device="cpu"), tokenizer, prompts, 4)
    assert batched["ranked_item_idxs"].to_list() == once["ranked_item_idxs"].to_list()
    torch.testing.assert_close(  # left padding moves no score beyond float rounding
        torch.tensor(batched["ranked_scores"].to_list()),
        torch.tensor(once["ranked_scores"].to_list()),
        rtol=1e-4,
        atol=1e-5,
    )
    # the merged reload ranks exactly like the adapter it was trained as
    unmerged = rank_prompts(in_memory, tokenizer, prompts)
    assert once["ranked_item_idxs"].to_list() == unmerged["ranked_item_idxs"].to_list()
    torch.testing.assert_close(
        torch.tensor(once["ranked_scores"].to_list()),
        torch.tensor(unmerged["ranked_scores"].to_list()),
        rtol=1e-4,
        atol=1e-4,
    )
    base_only = rank_prompts(load_ranker(base, None, device="cpu"), tokenizer, prompts)
    assert base_only["ranked_scores"].to_list() != once["ranked_scores"].to_list()


def test_progress_is_reported_every_share_and_at_the_end() -> None:
    lines: list[str] = []
    progress = ProgressLog("x", 100, lines.append, every=0.25)
    for done in range(7, 100, 7):  # batches of 7: 7, 14, ..., 98
        progress(done)
    progress(100)
    shares = [line.split("(")[1].split(")")[0] for line in lines]
    assert shares == ["28%", "56%", "77%", "100%"]  # past 25, 50, 75 %, then the end
