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
dtype's minimum elsewhere) works for the SDPA and eager attention paths alike. In a batch every
prefix is right-padded to the longest, so the segments of every row start at the same index P,
and the rows are right-padded to the longest; padded positions see only the prefix, so no row
of the softmax is empty.

That mask is right under any attention kernel, but a kernel given a dense T×T mask computes
every (query, key) pair and masks afterwards, while a segments prompt allows far fewer: the
prefix's causal triangle and each segment × (prefix + itself), about a quarter of T² on ml-100k
(a ~330-token prefix, 20 segments of ~35 tokens). `segment_attention` (registered with
transformers' attention interface as `SEGMENT_ATTENTION` by `use_segment_attention`) computes
the prefix as causal attention (the kernel skips the upper triangle), then the segment tokens
in windows of whole segments, each window's queries over [prefix keys + the window's own keys]
with its slice of the same mask. Same softmax over the same keys, so the same scores to
rounding (tests compare both paths, values and gradients). Only calls that carry the window
layout `segment_batch` adds take that path; every other call (letter prompts, generation) is
transformers' own SDPA. Hand-written because no library offers attention over this block
structure on CPU (FlexAttention's block-sparse kernels need CUDA or `torch.compile`).

Each block runs either on torch's SDPA kernel (`grouped_sdpa`) or as two GEMMs around one
softmax (`grouped_attention`), which autograd differentiates into GEMMs of the same dtype.
Which is faster depends on the machine: in bf16 a CPU with AMX runs the flash kernel on its
tiles, one without runs the matmuls faster (per machine: benchmarks/README.md#fp32-and-bf16).
So `choose_attention` decides as `precision.choose_dtype` does: with `auto` on a CPU it times
one window of the model's own shape both ways (forward for ranking, forward and backward for
training) and takes the faster, kept per machine (core.llm.probes), and the stages record
the figures; `kernel` or `matmul` force a path.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from lkg_pipeline.core.llm.model import final_hidden, token_logits, unwrapped
from lkg_pipeline.core.llm.probes import kept_or_measured, machine_key

ANSWERS = (" Yes", " No")
PREFIX, PAD = -1, -2  # segment index of prefix and padding tokens
SEGMENT_ATTENTION = "lkg_segments_sdpa"  # the attention implementation `use_segment_attention` sets
# Query tokens per attention window over the segments: whole segments are added to a window
# until it holds this many. Smaller windows attend to fewer other segments' keys but run the
# kernel on shorter blocks; of 128, 256 and 384, 256 ranks ml-100k prompts fastest.
WINDOW_TOKENS = 256
AttentionPath = Literal["auto", "kernel", "matmul"]
ATTENTION_PATHS: tuple[str, ...] = get_args(AttentionPath)
PATH_ATTRIBUTE = "segment_attention_path"  # set on each attention layer by use_segment_attention
# The window `choose_attention` times: an ml-100k prompt's (~330-token prefix, 20 segments of
# ~35 tokens) first window of whole segments over the prefix and itself.
PROBE_PREFIX, PROBE_QUERIES = 330, 245
# The matmuls must beat the kernel by this much to be chosen: the kernel is fused and holds no
# score matrix, so a near tie (fp32 training measured within 3%) keeps it.
MIN_MATMUL_SPEEDUP = 1.1


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
    """input_ids and position_ids (B, T), the additive block mask (B, 1, T, T), `ends`
    (B, C): the index of each segment's last token, and the windows `segment_attention` reads:
    `segment_windows` (W, 3), each window's (first query, end, first key of its own segments)
    over the segment tokens, and `segment_masks` (W, B, Q, P + K), each window's slice of the
    mask (additive, padded to the largest window: Q queries, P prefix and K own keys)."""
    prefix_width = max(len(p.prefix) for p in prompts)  # P: where every row's segments start
    width = prefix_width + max(p.n_tokens - len(p.prefix) for p in prompts)
    n_segments = len(prompts[0].segments)
    assert all(len(p.segments) == n_segments for p in prompts), "prompts differ in candidates"
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    positions = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    owner = torch.full((len(prompts), width), PAD, dtype=torch.long)  # (B, T) segment of token
    # where the segment holding each position starts (the position itself elsewhere)
    starts = torch.arange(width).repeat(len(prompts), 1)  # (B, T)
    ends = torch.empty((len(prompts), n_segments), dtype=torch.long)  # (B, C)
    for b, prompt in enumerate(prompts):
        p = len(prompt.prefix)
        input_ids[b, :p] = torch.tensor(prompt.prefix)
        positions[b, :p] = torch.arange(p)
        owner[b, :p] = PREFIX
        start = prefix_width
        for c, segment in enumerate(prompt.segments):
            stop = start + len(segment)
            input_ids[b, start:stop] = torch.tensor(segment)
            positions[b, start:stop] = torch.arange(p, p + len(segment))
            owner[b, start:stop] = c
            starts[b, start:stop] = start
            ends[b, c] = stop - 1
            start = stop
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]  # (T, T): key k ≤ query q
    query, key = owner[:, :, None], owner[:, None, :]  # (B, T, 1), (B, 1, T)
    allowed = causal[None] & ((key == PREFIX) | ((key == query) & (key != PAD)))  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    windows = window_bounds(owner, starts, prefix_width)
    shape = (len(windows), len(prompts), max(e - q for q, e, _ in windows))
    masks = torch.full((*shape, prefix_width + max(e - k for _, e, k in windows)), True)
    for w, (first, end, first_key) in enumerate(windows):
        keys = torch.cat([torch.arange(prefix_width), torch.arange(first_key, end)])
        masks[w, :, : end - first, : len(keys)] = ~allowed[:, first:end][:, :, keys]
    return {
        "input_ids": input_ids,
        "position_ids": positions,
        "attention_mask": mask[:, None],  # (B, 1, T, T)
        "ends": ends,
        "segment_windows": torch.tensor(windows, dtype=torch.long),  # (W, 3)
        "segment_masks": torch.zeros(masks.shape, dtype=dtype).masked_fill_(
            masks, torch.finfo(dtype).min
        ),  # (W, B, Q, P + K)
    }


def window_bounds(
    owner: torch.Tensor, starts: torch.Tensor, prefix_width: int
) -> list[tuple[int, int, int]]:
    """(first query, end, first key) of each window over positions [P, T): whole segments of
    the first row until a window holds `WINDOW_TOKENS`; its keys beyond the prefix start where
    the earliest segment (of any row) that a query of the window belongs to starts (`starts`,
    (B, T): each position's segment start)."""
    width = owner.shape[1]
    first_row = owner[0].tolist()
    bounds = [prefix_width]  # window starts, at segment starts of the first row
    for t in range(prefix_width + 1, width):
        if first_row[t] != first_row[t - 1] and t - bounds[-1] >= WINDOW_TOKENS:
            bounds.append(t)
    bounds.append(width)
    return [
        (first, end, int(starts[:, first:end].min()))
        for first, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segment_windows: torch.Tensor | None = None,
    segment_masks: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for transformers' `AttentionInterface`, returning (B, T, H, D) as its SDPA
    function does: with `segment_batch`'s windows, the prefix causally and then each window
    of segments over [prefix keys + its own keys]; without them, transformers' SDPA as is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segment_windows is None or segment_masks is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # Grouped-query heads stay grouped (B, KV, T, D): the kernel maps each query head to its
    # key head (`enable_gqa`) instead of keys repeated per query head, so the windows' key
    # copies are a third the size. Bit-identical scores and the same speed end to end (16
    # ml-100k prompts, bf16, AMX, 2 threads: 0.374 vs 0.372 s), a smaller working set.
    path = getattr(module, PATH_ATTRIBUTE, None)
    if path is None:  # a model set up without a choice: the fixed rule
        path = "matmul" if grouped_attention_pays(query) else "kernel"
    attend = grouped_attention if path == "matmul" else grouped_sdpa
    windows = segment_windows.tolist()
    p = windows[0][0]
    batch, heads, width, _ = query.shape
    out = query.new_empty((batch, width, heads, value.shape[-1]))  # (B, T, H, D), as SDPA's
    # the prefix; its padding is seen only by padding queries
    out[:, :p] = attend(
        query[:, :, :p], key[:, :, :p], value[:, :, :p], None, dropout, scaling, causal=True
    )
    for w, (first, end, first_key) in enumerate(windows):
        keys = torch.cat([key[:, :, :p], key[:, :, first_key:end]], dim=2)
        values = torch.cat([value[:, :, :p], value[:, :, first_key:end]], dim=2)
        mask = segment_masks[w, :, None, : end - first, : keys.shape[2]]  # (B, 1, Q, P + K)
        out[:, first:end] = attend(query[:, :, first:end], keys, values, mask, dropout, scaling)
    return out, None


def grouped_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    causal: bool = False,
) -> torch.Tensor:
    """(B, Q, H, D) attention of query (B, H, Q, D) over key and value (B, KV, K, D) under an
    additive mask (B, 1, Q, K) or causally, on torch's SDPA kernel."""
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=causal,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    ).transpose(1, 2)


def grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    causal: bool = False,
) -> torch.Tensor:
    """`grouped_sdpa` as two batched matmuls in the inputs' dtype around one softmax.

    Every pass over the (Q, K) score matrix stays in that dtype: the scale is applied to the
    queries (exact for SmolLM2's 1/8, a power of two; one rounding of the queries otherwise),
    the mask is added in place, and torch's softmax computes in fp32 internally and writes the
    dtype, the type the P·V GEMM reads anyway. The scores are the GEMM's fp32 accumulator
    rounded once to the dtype, so the values are those of a softmax over fp32 copies
    (gradients against the fp32 kernel's on real ml-100k blocks: cosine 0.99992–0.99995), with
    two passes over the scores instead of five forward and fewer backward (`make bench-dtype`
    times both: benchmarks/README.md#fp32-and-bf16). The query heads that share a key head are
    stacked into one GEMM (head h reads key head h // (H / KV), as transformers' `repeat_kv`),
    so keys are never copied."""
    batch, heads, n_queries, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    stacked = (query * scale).reshape(batch, kv_heads, group * n_queries, dim)
    scores = torch.matmul(stacked, key.transpose(-1, -2))  # (B, KV, G·Q, K)
    grouped = scores.view(batch, kv_heads, group, n_queries, n_keys)
    if causal:
        above = torch.ones(n_queries, n_keys, dtype=torch.bool, device=query.device)
        grouped.masked_fill_(above.triu_(n_keys - n_queries + 1), float("-inf"))
    if mask is not None:
        grouped.add_(mask[:, :, None])  # (B, 1, 1, Q, K) over the groups
    weights = scores.softmax(-1)
    if dropout:
        weights = F.dropout(weights, dropout)
    out = torch.matmul(weights, value)  # (B, KV, G·Q, D)
    return out.view(batch, heads, n_queries, dim).transpose(1, 2)


def grouped_attention_pays(query: torch.Tensor) -> bool:
    """Whether attention over `query` runs in bf16 on CPU, where `grouped_attention` is the faster
    path, with or without a backward.

    Torch's CPU flash kernel runs its backward at fp32 speed whatever the dtype, while the
    matmuls' backward is bf16 GEMMs, and with every pass over the scores in bf16 the forward
    alone is faster too, ranking as close to fp32 as the kernel does (`make bench-dtype`'s
    ablation: benchmarks/README.md#fp32-and-bf16). In fp32 the kernel stays (its backward is
    the faster one there); fp16 too: no dtype policy here picks it, nothing measures it."""
    return query.dtype == torch.bfloat16 and query.device.type == "cpu"


def use_segment_attention(model: Any, path: str | None = None) -> Any:
    """`model` (a Hugging Face model, before PEFT wraps it) computing attention with
    `segment_attention`, its windows on `path` ("kernel" or "matmul"; None: bf16 on CPU as
    matmuls, else the kernel); registered once per process, with SDPA's mask builder for the
    calls that carry no windows."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if path not in (None, "kernel", "matmul"):
        raise ValueError(f"attention path {path!r}: 'kernel' or 'matmul' (or None)")
    if SEGMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
        AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SEGMENT_ATTENTION)
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "o_proj"):  # an attention layer
            setattr(module, PATH_ATTRIBUTE, path)
    return model


@dataclass(frozen=True)
class AttentionChoice:
    """The path the segment windows take, and the evidence it was chosen on."""

    requested: str  # auto | kernel | matmul
    chosen: str  # kernel | matmul
    reason: str
    kernel_ms: float | None = None  # one probe window (CPU `auto` only)
    matmul_ms: float | None = None
    cpu_share: float | None = None  # of the process while it measured (core.llm.probes)
    measured_utc: str | None = None  # now, or when the kept measurement was taken

    def metadata(self) -> dict[str, Any]:
        """Flat, JSON-ready: what the log and the materialisation metadata show."""
        return {f"attention_{k}": v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        return f"segment attention as {self.chosen} ({self.reason})"


def choose_attention(
    requested: str, dtype: torch.dtype, device: str, config: Any, backward: bool
) -> AttentionChoice:
    """The path for `requested` with a model of Hugging Face `config` in `dtype` on `device`;
    `auto` times both on a CPU (cached per process), the kernel elsewhere."""
    if requested not in ATTENTION_PATHS:
        raise ValueError(f"unknown attention {requested!r}; choose one of {ATTENTION_PATHS}")
    if requested != "auto":
        return AttentionChoice(requested, requested, "requested")
    if device != "cpu":
        return AttentionChoice(requested, "kernel", f"{device}: the fused SDPA kernel")
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return _measured_attention(dtype, heads, kv_heads, head_dim, backward, torch.get_num_threads())


def _probe(
    attend: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    backward: bool,
) -> float:
    """Seconds of one call (and its backward), best of three after one untimed call."""
    query, key, value, mask = inputs
    best = float("inf")
    for repeat in range(4):
        q, k, v = (t.detach().requires_grad_(backward) for t in (query, key, value))
        start = time.perf_counter()
        out = attend(q, k, v, mask, 0.0, None)
        if backward:
            out.float().sum().backward()
        if repeat:
            best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=8)
def _measured_attention(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, backward: bool, threads: int
) -> AttentionChoice:
    keys = PROBE_PREFIX + PROBE_QUERIES

    def measure() -> dict[str, float]:
        generator = torch.Generator().manual_seed(0)

        def tensor(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(dtype)

        query = tensor(1, heads, PROBE_QUERIES, head_dim)
        key, value = tensor(1, kv_heads, keys, head_dim), tensor(1, kv_heads, keys, head_dim)
        allowed = torch.ones(PROBE_QUERIES, keys, dtype=torch.bool)
        allowed[:, PROBE_PREFIX:] = torch.ones(PROBE_QUERIES, PROBE_QUERIES).bool().tril()
        mask = torch.zeros(1, 1, PROBE_QUERIES, keys, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        inputs = (query, key, value, mask)
        # alternating rounds, best of each: the first calls also wake the thread pool
        seconds = {"kernel": float("inf"), "matmul": float("inf")}
        for _ in range(2):
            seconds["kernel"] = min(seconds["kernel"], _probe(grouped_sdpa, inputs, backward))
            seconds["matmul"] = min(seconds["matmul"], _probe(grouped_attention, inputs, backward))
        return {"kernel_ms": seconds["kernel"] * 1e3, "matmul_ms": seconds["matmul"] * 1e3}

    window = (PROBE_QUERIES, keys, heads, kv_heads, head_dim)
    key = machine_key("attention", threads, dtype=dtype, window=window, backward=backward)
    probed = kept_or_measured(key, measure)
    kernel_ms, matmul_ms = probed.result["kernel_ms"], probed.result["matmul_ms"]
    speedup = kernel_ms / matmul_ms
    chosen = "matmul" if speedup >= MIN_MATMUL_SPEEDUP else "kernel"
    what = "forward and backward" if backward else "forward"
    reason = (
        f"measured one {PROBE_QUERIES}×{keys} window ({heads} heads, {str(dtype)[6:]}, {what}, "
        f"{threads} threads): kernel {kernel_ms:.2f} ms, matmul {matmul_ms:.2f} ms "
        f"(×{speedup:.2f}; matmul needs ×{MIN_MATMUL_SPEEDUP}); "
    ) + probed.note(threads, "attention")
    return AttentionChoice("auto", chosen, reason, kernel_ms, matmul_ms, probed.cpu_share,
                           probed.measured_utc)  # fmt: skip


def decoder_inputs(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    """The decoder's keyword arguments for a `segment_batch`: ids, positions, the masks in the
    model's dtype, and the windows `segment_attention` reads when the batch has them (any other
    attention reads `attention_mask` alone)."""
    inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": batch["attention_mask"].to(dtype),
    }
    if "segment_windows" in batch:
        inputs["segment_windows"] = batch["segment_windows"]
        inputs["segment_masks"] = batch["segment_masks"].to(dtype)
    return inputs


def segment_scores(
    model: Any, batch: dict[str, torch.Tensor], answer_ids: tuple[int, int]
) -> torch.Tensor:
    """(B, C) logit(yes) − logit(no) at each segment's end; differentiable (training uses it).

    Only the two answer rows of the head are applied, in fp32, to the hidden state at each
    segment end (`llm.token_logits`: 20 positions × 2 tokens, not the vocabulary).
    """
    ends = batch["ends"]  # (B, C)
    hidden = final_hidden(model, **decoder_inputs(batch, unwrapped(model).dtype))  # (B, T, H)
    at_ends = hidden.gather(1, ends[:, :, None].expand(-1, -1, hidden.shape[-1]))  # (B, C, H)
    pair = torch.tensor(answer_ids, device=hidden.device)  # (2,)
    logits = token_logits(model, at_ends, pair)  # (B, C, 2), fp32
    return logits[..., 0] - logits[..., 1]  # (B, C)
