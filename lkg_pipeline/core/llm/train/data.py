"""The training data: train and val prompts read from the prompts file, tokenised into rows, and
batched in an order that a resumed run re-creates exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch

from lkg_pipeline.core.llm.model import LETTERS, letter_token_ids
from lkg_pipeline.core.llm.prompts import PROMPT_COLUMNS
from lkg_pipeline.core.llm.rank.scoring import (
    left_pad,
    pad_token_id,
    prompt_log_priors,
    prompt_segments,
    tokenize_prompt,
)
from lkg_pipeline.core.llm.segments import answer_token_ids, segment_batch, tokenize_segments
from lkg_pipeline.core.llm.train.config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass(frozen=True)
class Examples:
    example_ids: list[int]
    prompts: list[str]
    targets: list[int]  # 0..19: the position of the true item among the candidates
    segments: list[list[str]] | None = None  # the segments format (prompts are the prefixes)
    # (N, 20) log-softmax of the retriever's scores over the candidates, when asked for
    priors: np.ndarray | None = None


def read_examples(
    path: Path, split: str, limit: int | None, seed: int, with_prior: bool = False
) -> Examples:
    """Rows of `split` whose true item is among the candidates (the only ones a ranker can learn
    from or be scored on), a seeded sample of `limit` of them, in example_id order; with
    `with_prior`, the retriever's log-prior of each candidate too."""
    frame = pl.read_parquet(path)
    for name in ("segments", "retriever_scores"):  # files written before these columns existed
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, PROMPT_COLUMNS[name]).alias(name))
    frame = frame.select(list(PROMPT_COLUMNS))
    wrong = {c: str(frame.schema[c]) for c, t in PROMPT_COLUMNS.items() if frame.schema[c] != t}
    assert not wrong, f"{path}: columns with unexpected types {wrong}; want {PROMPT_COLUMNS}"
    sizes = frame["candidate_item_idxs"].list.len()
    assert bool((sizes == len(LETTERS)).all()), f"{path}: every row needs {len(LETTERS)} candidates"
    bad = frame.filter((pl.col("target_index") < -1) | (pl.col("target_index") >= len(LETTERS)))
    assert bad.height == 0, f"{path}: target_index outside -1..19 in {bad.height} rows"
    rows = frame.filter((pl.col("split") == split) & (pl.col("target_index") >= 0))
    if limit is not None and rows.height > limit:
        rows = rows.sample(n=limit, seed=seed)
    rows = rows.sort("example_id")
    priors = prompt_log_priors(rows, f"{split} prompts", f"{path}: ") if with_prior else None
    return Examples(
        example_ids=rows["example_id"].to_list(),
        prompts=rows["prompt"].to_list(),
        targets=rows["target_index"].cast(pl.Int64).to_list(),
        segments=prompt_segments(rows),
        priors=priors,
    )


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A fresh permutation per epoch that depends only on (seed, epoch).

    Resuming re-creates exactly the order of the interrupted epoch, so skipping the batches
    already trained on skips the same examples. accelerate calls `set_epoch` on it.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    if "segments" in rows[0]:  # the segments format: block mask, scores at segment ends
        batch = segment_batch([r["segments"] for r in rows], pad_id)
        batch["answer_ids"] = torch.tensor([r["answer_ids"] for r in rows])  # (B, 2)
        batch["n_tokens"] = torch.tensor([r["segments"].n_tokens for r in rows])  # (B,)
    else:
        batch = left_pad([r["input_ids"] for r in rows], pad_id)
        batch["letter_ids"] = torch.tensor([r["letter_ids"] for r in rows])  # (B, 20)
        batch["n_tokens"] = batch["attention_mask"].sum(dim=1)  # (B,) without padding
    batch["target"] = torch.tensor([r["target"] for r in rows])  # (B,)
    if "prior" in rows[0]:
        batch["prior"] = torch.tensor(np.stack([r["prior"] for r in rows]), dtype=torch.float32)
    return batch


def _letter_rows(
    tokenizer: Any, train: Examples, config: TrainConfig, max_positions: int
) -> list[dict[str, Any]]:
    rows = []
    for prompt, target in zip(train.prompts, train.targets, strict=True):
        letters = letter_token_ids(tokenizer, prompt)
        ids = tokenize_prompt(tokenizer, prompt)
        if config.loss == "lm":  # the reference's answer: the letter, then EOS
            ids = [*ids, letters[target], int(tokenizer.eos_token_id)]
        assert len(ids) <= max_positions, (
            f"a train prompt has {len(ids)} tokens > model limit {max_positions}"
        )
        rows.append({"input_ids": ids, "letter_ids": letters, "target": target})
    return rows


def _segment_rows(
    tokenizer: Any, train: Examples, config: TrainConfig, max_positions: int
) -> list[dict[str, Any]]:
    if config.loss != "letters":
        raise ValueError("the segments format trains with loss 'letters' (CE over the 20)")
    assert train.segments is not None
    rows = []
    for prefix, parts, target in zip(train.prompts, train.segments, train.targets, strict=True):
        tokens = tokenize_segments(tokenizer, prefix, parts)
        longest = len(tokens.prefix) + max(len(p) for p in tokens.segments)
        assert longest <= max_positions, f"a train prompt reaches position {longest}"
        answers = answer_token_ids(tokenizer, parts[0])
        rows.append({"segments": tokens, "answer_ids": answers, "target": target})
    return rows


def get_dataloaders(
    accelerator: Accelerator, config: TrainConfig, tokenizer: Any, prompts: Path, max_positions: int
) -> tuple[torch.utils.data.DataLoader, Examples, list[list[int]]]:
    """(train loader, val examples, distinct letter-id lists seen in the train prompts)."""
    with accelerator.main_process_first():
        prior = config.retriever_prior
        train = read_examples(prompts, "train", config.max_train_examples, config.seed, prior)
        val = read_examples(prompts, "val", config.max_val_examples, config.seed, prior)
        if train.segments is not None:
            rows = _segment_rows(tokenizer, train, config, max_positions)
        else:
            rows = _letter_rows(tokenizer, train, config, max_positions)
        if train.priors is not None:
            for row, row_prior in zip(rows, train.priors, strict=True):
                row["prior"] = row_prior
    assert rows, f"{prompts}: no train rows with the true item among the candidates"
    assert val.prompts, f"{prompts}: no val rows with the true item among the candidates"
    pad_id = pad_token_id(tokenizer)
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=config.batch_size,
        sampler=EpochShuffle(len(rows), config.seed),
        collate_fn=lambda batch: collate(batch, pad_id),
        # Its own generator: every new iterator draws a seed from it, which from torch's global
        # RNG would shift a resumed run's dropout masks against the interrupted run's.
        generator=torch.Generator().manual_seed(config.seed),
    )
    seen = sorted({tuple(r.get("letter_ids", r.get("answer_ids"))) for r in rows})
    return loader, val, [list(s) for s in seen]
