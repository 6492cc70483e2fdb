"""The ranker at inference: one forward pass per prompt ranks its 20 candidates.

A candidate's score is the last-position logit of its letter (the verbalizer), read with
`logits_to_keep=1` so the vocabulary projection runs for one position only; nothing is
generated. Training (`train_lora`) validates with the same `score_prompts`, so the figures it
selects the adapter by are the figures `rankings` reports.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from lkg_pipeline.core.evaluate.metrics import rank_of_target
from lkg_pipeline.core.llm.model import LETTERS, final_hidden, letter_token_ids, token_logits
from lkg_pipeline.core.llm.rank.fusion import retriever_log_prior

# One row per scored prompt: what `rankings` stores and the evaluation reads.
RANKING_COLUMNS = {
    "example_id": pl.Int64,
    "user_idx": pl.Int32,
    "split": pl.String,
    "variant": pl.String,
    "ranked_item_idxs": pl.List(pl.Int32),  # the 20 candidates, best first
    "ranked_scores": pl.List(pl.Float32),  # their letter logits, same order
    "target_item_idx": pl.Int32,  # null when the true item is not a candidate
    "target_rank": pl.Int32,  # 1..20 among the candidates; null when not a candidate
    "n_tokens": pl.Int32,
    "seconds": pl.Float64,  # this prompt's share of its batch's forward pass
}


def tokenize_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids as the model sees them (with the tokenizer's BOS where it has one).

    The letter ids are read after the prompt without special tokens; a tokenizer that also
    appended something (an EOS) would put the letters one position too late, so that fails.
    """
    ids = tokenizer(prompt)["input_ids"]
    plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[len(ids) - len(plain) :] == plain, (
        "the tokenizer appends special tokens after the prompt; the answer would not follow it"
    )
    return ids


def left_pad(rows: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ids, mask and positions: the last column is every prompt's last token.

    Position ids are passed explicitly because a plain forward (unlike `generate`) numbers
    positions from the first column, which would shift every left-padded prompt.
    """
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}


def pad_token_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    assert pad is not None, "the tokenizer has neither a pad nor an EOS token"
    return int(pad)


def max_positions(model: Any) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or sys.maxsize)


@dataclass(frozen=True)
class PromptScores:
    scores: torch.Tensor  # (N, 20) letter logits, in prompt order
    seconds: np.ndarray  # (N,) wall seconds of each prompt's batch divided by its size
    n_tokens: np.ndarray  # (N,) prompt length in tokens (with special tokens)


def score_prompts_timed(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 4,
    segments: Sequence[Sequence[str]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> PromptScores:
    """Candidate scores of each prompt, batched by length, with the time each batch took;
    `progress(prompts done)` after every batch.

    `segments` None: the letter format, the letter logits at the last position. Otherwise the
    segments format (`prompts` are the shared prefixes, core.llm.segments). Prompts are sorted by
    length and cut into batches of `batch_size` (length bucketing: little padding); letter
    prompts are left-padded so that the last column is every row's answer position. Dropout is
    off while scoring (LoRA dropout would make scores random); the model's mode is restored.
    """
    assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
    n = len(prompts)
    if n == 0:
        empty = np.zeros(0)
        return PromptScores(torch.empty((0, len(LETTERS))), empty, empty.astype(np.int64))
    if segments is not None:
        assert len(segments) == n, f"{len(segments)} segment lists for {n} prompts"
        return _score_segments(model, tokenizer, prompts, segments, batch_size, progress)
    pad_id = pad_token_id(tokenizer)
    limit = max_positions(model)
    rows = [tokenize_prompt(tokenizer, p) for p in prompts]
    letters = torch.tensor([letter_token_ids(tokenizer, p) for p in prompts])  # (N, 20)
    for i, row in enumerate(rows):
        assert len(row) <= limit, f"prompt {i} has {len(row)} tokens > model limit {limit}"

    def forward(idx: list[int], device: torch.device) -> torch.Tensor:
        padded = left_pad([rows[i] for i in idx], pad_id)
        batch = {k: v.to(device) for k, v in padded.items()}
        last = final_hidden(model, **batch)[:, -1]  # (B, H): left padding, the answer slot
        return token_logits(model, last, letters[idx].to(device))  # (B, 20), fp32

    lengths = [len(r) for r in rows]
    return _batched(model, lengths, batch_size, len(LETTERS), forward, progress)


def _score_segments(
    model: Any,
    tokenizer: Any,
    prefixes: Sequence[str],
    segments: Sequence[Sequence[str]],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> PromptScores:
    from lkg_pipeline.core.llm.segments import (
        answer_token_ids,
        segment_batch,
        segment_scores,
        tokenize_segments,
    )

    rows = [tokenize_segments(tokenizer, p, s) for p, s in zip(prefixes, segments, strict=True)]
    width = len(rows[0].segments)
    answers = {answer_token_ids(tokenizer, s[0]) for s in segments}
    assert len(answers) == 1, f"segments end in different answer tokens: {answers}"
    answer_ids = answers.pop()
    limit = max_positions(model)
    pad_id = pad_token_id(tokenizer)

    def forward(idx: list[int], device: torch.device) -> torch.Tensor:
        chosen = [rows[i] for i in idx]
        longest = max(len(r.prefix) + max(len(s) for s in r.segments) for r in chosen)
        assert longest <= limit, f"a prompt reaches position {longest} > model limit {limit}"
        batch = segment_batch(chosen, pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        return segment_scores(model, batch, answer_ids)  # (B, C)

    return _batched(model, [r.n_tokens for r in rows], batch_size, width, forward, progress)


def _batched(
    model: Any,
    lengths: Sequence[int],
    batch_size: int,
    width: int,
    forward: Any,
    progress: Callable[[int], None] | None = None,
) -> PromptScores:
    """Run `forward(indices, device) -> (B, width)` over length-sorted batches, timed."""
    n = len(lengths)
    device = next(model.parameters()).device
    order = sorted(range(n), key=lambda i: lengths[i])
    out = torch.empty((n, width), dtype=torch.float32)  # (N, width)
    seconds = np.zeros(n)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                tick = time.perf_counter()
                idx = order[start : start + batch_size]
                out[idx] = forward(idx, device).cpu()
                seconds[idx] = (time.perf_counter() - tick) / len(idx)
                if progress is not None:
                    progress(start + len(idx))
    finally:
        model.train(was_training)
    return PromptScores(out, seconds, np.asarray(lengths, dtype=np.int64))


def score_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 4,
    segments: Sequence[Sequence[str]] | None = None,
) -> torch.Tensor:
    """(N, 20) candidate scores of each prompt, in prompt order (see `score_prompts_timed`)."""
    return score_prompts_timed(model, tokenizer, prompts, batch_size, segments).scores


def prompt_segments(prompts: pl.DataFrame) -> list[list[str]] | None:
    """The `segments` column of a prompts table, or None for letter prompts; never a mix."""
    if "segments" not in prompts.columns or prompts["segments"].null_count() == prompts.height:
        return None
    if prompts["segments"].null_count():
        raise ValueError("prompts mix the letters and segments formats; build them with one")
    return prompts["segments"].to_list()


def default_batch_size(model: Any) -> int:
    """Prompts per forward when none is given: 1 on CPU, where padding only adds work
    (SmolLM2, ~880-token prompts, 2 cores: 1.52 s/prompt at batch 1, 1.85 at 8), 16 on a GPU."""
    return 1 if next(model.parameters()).device.type == "cpu" else 16


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_ranker(
    base_model: Path,
    adapter: Path | None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    attention: str | None = None,
) -> Any:
    """The base model with the LoRA adapter (no adapter: the base model), in eval mode, with
    the segments format's windowed attention on the `attention` path
    (`segments.use_segment_attention`) and fused RMSNorms (`llm.fuse_rms_norms`).

    In fp32 the adapter is merged (B·A folded into the weights once: no extra matmuls). In a
    lower precision merging would round it away (an update about 1e-3 of a weight's size is
    mostly below bf16's 8-bit mantissa: top-1 agreement with fp32 fell to 72%), so each adapted
    layer is folded instead (`lowrank.fold_lora`): one GEMM over the input widened by its
    LoRA projection, the update summed in the kernel's fp32 accumulator.
    """
    from transformers import AutoModelForCausalLM

    from lkg_pipeline.core.llm.lowrank import fold_lora
    from lkg_pipeline.core.llm.model import fuse_rms_norms
    from lkg_pipeline.core.llm.segments import use_segment_attention

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    model = use_segment_attention(model, attention)
    fuse_rms_norms(model)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=True)
        model = model.merge_and_unload() if dtype == torch.float32 else fold_lora(model)
    return model.to(device=device or default_device()).eval()


def prompt_log_priors(prompts: pl.DataFrame, described: str, where: str = "") -> np.ndarray:
    """(N, 20) retriever log-prior of each prompt's candidates (`retriever_scores`); an error
    naming how many of the `described` prompts (e.g. "train prompts") have none, after
    `where` (e.g. the file)."""
    missing = prompts["retriever_scores"].null_count()
    if missing:
        raise ValueError(
            f"{where}{missing} of {prompts.height} {described} have no retriever scores, which a "
            "ranker trained over the retriever needs: make the candidates with train_policy "
            "'retriever' and the prompts from them, or turn retriever_prior off"
        )
    raw = np.asarray(prompts["retriever_scores"].to_list(), dtype=np.float64)
    return retriever_log_prior(raw.reshape(prompts.height, len(LETTERS)))


def trained_over(adapter: Path | None) -> bool:
    """Whether the adapter was trained over the retriever's scores (`retriever_prior` in its
    training.json): then it ranks by prior + LLM scores, as it was trained and validated."""
    if adapter is None:
        return False
    summary = json.loads((Path(adapter) / "training.json").read_text())
    return bool(summary["config"].get("retriever_prior", False))


@dataclass
class ProgressLog:
    """`emit`s "what: done/total (share), rate, ETA" each time another `every` share of the
    work is done, and at the end: a long ranking run reports how far it is in the run log."""

    what: str
    total: int
    emit: Callable[[str], None]
    every: float = 0.05
    started: float = field(default_factory=time.perf_counter)
    reported: int = 0  # shares of `every` reported so far

    def __call__(self, done: int) -> None:
        share = done / self.total if self.total else 1.0
        if int(share / self.every) <= self.reported and done < self.total:
            return
        self.reported = int(share / self.every)
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else float("inf")
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        self.emit(
            f"{self.what}: {done}/{self.total} prompts ({share:.0%}), {rate:.2f} prompts/s, "
            f"ETA {eta / 60:.1f} min"
        )


def rank_prompts(
    model: Any,
    tokenizer: Any,
    prompts: pl.DataFrame,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    retriever_prior: bool = False,
) -> pl.DataFrame:
    """Each prompt's candidates in the model's order, the true item's rank and the time taken.

    Ties go to the earlier letter (a stable sort), the rule every stage's metrics use.
    `batch_size` None: `default_batch_size`. `progress(prompts done)` after every batch, e.g.
    a `ProgressLog`. `retriever_prior`: rank by the retriever's log-prior + the LLM's scores,
    as an adapter trained with `retriever_prior` was trained and validated (`trained_over`).
    """
    priors = None
    if retriever_prior:
        priors = torch.as_tensor(prompt_log_priors(prompts, "prompts"))
    batch_size = batch_size or default_batch_size(model)
    scored = score_prompts_timed(
        model,
        tokenizer,
        prompts["prompt"].to_list(),
        batch_size,
        prompt_segments(prompts),
        progress,
    )
    scores = scored.scores  # (N, 20)
    if priors is not None:
        scores = scores + priors.to(scores.dtype)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (N, 20)
    candidates = torch.tensor(prompts["candidate_item_idxs"].to_list(), dtype=torch.long)
    target_index = torch.tensor(prompts["target_index"].to_list(), dtype=torch.long)  # (N,)
    known = target_index >= 0
    rank = rank_of_target(scores, target_index.clamp(min=0), tie_break="index")  # (N,)
    target_item = candidates.gather(1, target_index.clamp(min=0)[:, None])[:, 0]
    return pl.DataFrame(
        {
            "example_id": prompts["example_id"],
            "user_idx": prompts["user_idx"],
            "split": prompts["split"],
            "variant": prompts["variant"],
            "ranked_item_idxs": candidates.gather(1, order).tolist(),
            "ranked_scores": scores.gather(1, order).tolist(),
            "target_item_idx": [int(t) if k else None for t, k in zip(target_item, known)],
            "target_rank": [int(r) if k else None for r, k in zip(rank, known)],
            "n_tokens": scored.n_tokens,
            "seconds": scored.seconds,
        },
        schema=RANKING_COLUMNS,
    )
