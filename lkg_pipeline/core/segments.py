"""The `segments` prompt format at the model: one forward pass, 20 candidates that never see
each other.

A prompt is a shared prefix (instruction and history) followed by one segment per candidate.
The sequence is [prefix][segment 1]…[segment 20]; a block attention mask lets every segment
token attend to the prefix and, causally, to its own segment only, and each segment's positions
continue from the end of the prefix, so every candidate is read exactly as if it came right
after the history, whatever its place in the list. The score of a candidate is
logit(" Yes") − logit(" No") at its segment's last token. The model therefore cannot prefer a
candidate for its position (no letter prior to calibrate), and the pass costs about the tokens
of one letter prompt.

Transformers takes a ready 4D mask as it is (`masking_utils` returns a 4D `attention_mask`
unchanged), so this needs no change to the model: an additive float mask (0 where allowed, the
dtype's minimum elsewhere) works for the SDPA and eager attention paths alike. Batches are
right-padded; padded positions see only the prefix, so no row of the softmax is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lkg_pipeline.core.llm import final_hidden, token_logits, unwrapped

ANSWERS = (" Yes", " No")
PREFIX, PAD = -1, -2  # segment index of prefix and padding tokens


@dataclass(frozen=True)
class SegmentPrompt:
    """Token ids of one prompt in the segments format."""

    prefix: list[int]  # with the tokenizer's BOS
    segments: list[list[int]]  # one per candidate, no special tokens

    @property
    def n_tokens(self) -> int:
        return len(self.prefix) + sum(len(s) for s in self.segments)


def answer_token_ids(tokenizer: Any, segment: str) -> tuple[int, int]:
    """The ids of " Yes" and " No" as they follow `segment`, each checked to add one token."""
    base = tokenizer(segment, add_special_tokens=False)["input_ids"]
    ids = []
    for answer in ANSWERS:
        full = tokenizer(segment + answer, add_special_tokens=False)["input_ids"]
        if len(full) != len(base) + 1 or full[: len(base)] != base:
            raise ValueError(
                f"{answer!r} does not add exactly one token after …{segment[-30:]!r}: "
                f"{len(base)} → {len(full)} tokens"
            )
        ids.append(full[-1])
    assert ids[0] != ids[1], f"yes and no are the same token {ids[0]}"
    return ids[0], ids[1]


def tokenize_segments(tokenizer: Any, prefix: str, segments: Sequence[str]) -> SegmentPrompt:
    """Prefix with special tokens (as `ranking.tokenize_prompt`), segments without."""
    prefix_ids = tokenizer(prefix)["input_ids"]
    parts = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in segments]
    assert all(parts), "an empty segment has no last token to score"
    return SegmentPrompt(prefix_ids, parts)


def segment_batch(
    prompts: Sequence[SegmentPrompt], pad_id: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """input_ids and position_ids (B, T), the additive block mask (B, 1, T, T), and `ends`
    (B, C): the index of each segment's last token."""
    width = max(p.n_tokens for p in prompts)
    n_segments = len(prompts[0].segments)
    assert all(len(p.segments) == n_segments for p in prompts), "prompts differ in candidates"
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    positions = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    owner = torch.full((len(prompts), width), PAD, dtype=torch.long)  # (B, T) segment of token
    ends = torch.empty((len(prompts), n_segments), dtype=torch.long)  # (B, C)
    for b, prompt in enumerate(prompts):
        p = len(prompt.prefix)
        input_ids[b, :p] = torch.tensor(prompt.prefix)
        positions[b, :p] = torch.arange(p)
        owner[b, :p] = PREFIX
        start = p
        for c, segment in enumerate(prompt.segments):
            stop = start + len(segment)
            input_ids[b, start:stop] = torch.tensor(segment)
            positions[b, start:stop] = torch.arange(p, p + len(segment))
            owner[b, start:stop] = c
            ends[b, c] = stop - 1
            start = stop
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]  # (T, T): key k ≤ query q
    query, key = owner[:, :, None], owner[:, None, :]  # (B, T, 1), (B, 1, T)
    allowed = causal[None] & ((key == PREFIX) | ((key == query) & (key != PAD)))  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return {
        "input_ids": input_ids,
        "position_ids": positions,
        "attention_mask": mask[:, None],  # (B, 1, T, T)
        "ends": ends,
    }


def segment_scores(
    model: Any, batch: dict[str, torch.Tensor], answer_ids: tuple[int, int]
) -> torch.Tensor:
    """(B, C) logit(yes) − logit(no) at each segment's end; differentiable (training uses it).

    Only the two answer rows of the head are applied, in fp32, to the hidden state at each
    segment end (`llm.token_logits`: 20 positions × 2 tokens, not the vocabulary).
    """
    ends = batch["ends"]  # (B, C)
    hidden = final_hidden(
        model,
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch["attention_mask"].to(unwrapped(model).dtype),
    )  # (B, T, H)
    at_ends = hidden.gather(1, ends[:, :, None].expand(-1, -1, hidden.shape[-1]))  # (B, C, H)
    pair = torch.tensor(answer_ids, device=hidden.device)  # (2,)
    logits = token_logits(model, at_ends, pair)  # (B, C, 2), fp32
    return logits[..., 0] - logits[..., 1]  # (B, C)
