"""What every retriever family shares: its configuration, item scoring, padding and storage.

A retriever is a causal sequence model over item ids whose hidden state at each position
scores the whole catalogue through the tied item embedding (plus a popularity bias). The
families (`lrurec.LRURec`, `sasrec.SASRec`) differ only in `encode`; training, scoring and
candidate retrieval (`core.retrieval.training`, `.ranking`, `.candidates`) work on any of them.

Ids: models use internal ids 1..n_items with 0 as padding; everything outside the model
speaks external 0-based item indices. `left_pad` and `SequentialRecommender.item_scores` do
the conversion.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
Architecture = Literal["lrurec", "sasrec"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
SelectionMetric = Literal["Recall@10", "NDCG@10"]


@dataclass(frozen=True)
class RetrieverConfig:
    """Hyperparameters of the model and of its training loop, saved with every checkpoint."""

    n_items: int  # number of real items; the embedding has one more row for padding
    architecture: Architecture = "lrurec"  # the model family (lrurec.py, sasrec.py)
    d_model: int = 64  # embedding / hidden size (paper: 64)
    n_layers: int = 2  # LRU or transformer blocks (paper: 2)
    n_heads: int = 2  # attention heads (sasrec only)
    dropout: float = 0.2  # embedding, block output and FFN dropout (DESIGN.md)
    max_len: int = 200  # longest input the model sees (200 MovieLens, 50 Amazon)
    r_min: float = 0.8  # smallest initial |λ|: the shortest memory (lrurec only)
    r_max: float = 0.99  # largest initial |λ|: the longest memory, ~100 steps (lrurec only)
    lr: float = 1e-3  # AdamW learning rate (DESIGN.md)
    weight_decay: float = 0.01  # AdamW decay, on weight matrices and embeddings only
    grad_clip: float = 5.0  # max global grad norm (DESIGN.md)
    batch_size: int = 64  # training windows per step: 18 steps/epoch on ML-100K
    sliding_step: int | None = None  # stride between windows of long sequences; None = max_len
    max_epochs: int = 100  # hard cap; early stopping normally ends training well before
    patience: int = 10  # epochs without a better validation `selection_metric` before stopping
    selection_metric: SelectionMetric = "Recall@10"  # early stopping key (the other breaks ties)
    eval_batch_size: int = 256  # users per forward pass when scoring
    # Training loss over the target and this many uniformly drawn items per batch (shared by
    # its positions) instead of the whole catalogue (sampled softmax); None: the full softmax.
    # For catalogues where the full projection dominates an epoch (10x Beauty); scoring and
    # evaluation always rank the whole catalogue.
    sampled_negatives: int | None = None
    seed: int = 42  # seeds init, dropout and shuffling: CPU runs are repeatable

    def __post_init__(self) -> None:
        """Refuse a setting that cannot train: a ValueError naming it (not an assert, which
        `python -O` would drop), before any epoch runs."""
        at_least_one = (
            "n_items", "d_model", "n_layers", "n_heads", "max_len", "batch_size", "max_epochs",
            "patience", "eval_batch_size",
        )  # fmt: skip
        problems = [f"{name} must be >= 1, got {getattr(self, name)}" for name in at_least_one
                    if getattr(self, name) < 1]  # fmt: skip
        if self.architecture not in ARCHITECTURES:
            problems.append(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        if not 0.0 < self.r_min < self.r_max < 1.0:
            problems.append(
                f"need 0 < r_min < r_max < 1, got r_min={self.r_min}, r_max={self.r_max}"
            )
        if self.n_heads >= 1 and self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.lr > 0 or self.weight_decay < 0:
            problems.append(
                f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )
        if not self.grad_clip > 0:  # 0 froze training, a negative one trained it backwards
            problems.append(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.sliding_step is not None and self.sliding_step < 1:
            problems.append(f"sliding_step must be >= 1, got {self.sliding_step}")
        if self.selection_metric not in get_args(SelectionMetric):
            problems.append(f"selection_metric must be one of {get_args(SelectionMetric)}")
        if self.sampled_negatives is not None and not 1 <= self.sampled_negatives < self.n_items:
            problems.append(
                f"sampled_negatives must be in [1, n_items), got {self.sampled_negatives}"
            )
        if problems:
            raise ValueError("retriever config: " + "; ".join(problems))


class SequentialRecommender(nn.Module):
    """Item sequence -> hidden state per position -> scores over all items (tied embedding).

    Subclasses define `encode`; this class owns the item embedding, the popularity bias and
    the initialisation both families use (truncated normal, std 0.02, as LRURec and SASRec).
    """

    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items + 1, config.d_model, padding_idx=0)
        self.item_bias = nn.Parameter(torch.zeros(config.n_items))  # (I,) popularity prior

    def _init_weights(self) -> None:
        """Call at the end of a subclass's __init__; LayerNorms and LRU params keep theirs."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) internal ids, 0 = left padding -> hidden states (B, L, d)."""
        raise NotImplementedError

    @staticmethod
    def padding_mask(items: torch.Tensor) -> torch.Tensor:
        """(B, L) True on real items; asserts the padding is on the left only."""
        assert items.dim() == 2, f"items must be (B, L), got {tuple(items.shape)}"
        mask = items > 0
        # Right or inner padding would put pad steps after real items: left only.
        assert bool((mask[:, 1:] >= mask[:, :-1]).all()), "padding (id 0) must be on the left"
        return mask

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> scores (..., I), column j = external item j (internal j + 1)."""
        return hidden @ self.item_emb.weight[1:].T + self.item_bias

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) left-padded -> scores (B, I) for the next item after the last one."""
        return self.item_scores(self.encode(items)[:, -1])  # (B, I)


def left_pad(seqs: list[list[int]], max_len: int) -> torch.Tensor:
    """External 0-based item lists -> (B, L) internal ids, keeping the last max_len items.

    Left padding keeps every sequence's last item at position -1, which is where `forward`
    reads the prediction.
    """
    assert seqs, "left_pad needs at least one sequence"
    length = min(max(len(s) for s in seqs), max_len)
    out = torch.zeros((len(seqs), length), dtype=torch.long)  # (B, L)
    for row, seq in enumerate(seqs):
        tail = seq[-length:] if seq else []
        if tail:
            out[row, length - len(tail) :] = torch.as_tensor(tail, dtype=torch.long) + 1
    return out


def build_retriever(config: RetrieverConfig) -> SequentialRecommender:
    """A freshly initialised model of `config.architecture`."""
    # Imported here: both modules import this one for the config and the base class.
    from lkg_pipeline.core.retrieval.lrurec import LRURec
    from lkg_pipeline.core.retrieval.sasrec import SASRec

    return {"lrurec": LRURec, "sasrec": SASRec}[config.architecture](config)


def save_retriever(
    model: SequentialRecommender, config: RetrieverConfig, directory: str | Path
) -> Path:
    """Write model.safetensors + config.json; the tied output uses item_emb, so no duplicates."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    return directory


def load_retriever(directory: str | Path) -> SequentialRecommender:
    """Rebuild the model from a `save_retriever` directory, in eval mode on CPU.

    A config.json without `architecture` (written before SASRec existed) is an LRURec.
    """
    directory = Path(directory)
    config = RetrieverConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    model = build_retriever(config)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    return model.eval()
