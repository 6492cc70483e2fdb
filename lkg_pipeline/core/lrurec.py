"""LRURec: linear recurrent units for sequential recommendation (Yue et al., 2024).

A diagonal complex linear recurrence has no nonlinearity across time, so the whole sequence
can be computed with an associative (parallel) scan in log2(L) vectorised steps instead of
a Python loop over time; that is what makes training on 2 CPU cores cheap. The model sees
only item ids (no positional embedding): the recurrence itself encodes order.

Ids: the model uses internal ids 1..n_items with 0 as padding; everything outside this file
speaks external 0-based item indices. `left_pad` and `LRURec.item_scores` do the conversion.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class LRURecConfig:
    """Hyperparameters of the model and of its training loop, saved with every checkpoint."""

    n_items: int  # number of real items; the embedding has one more row for padding
    d_model: int = 64  # embedding / hidden size (paper: 64)
    n_layers: int = 2  # LRU blocks (paper: 2)
    dropout: float = 0.2  # embedding, LRU output and FFN dropout (DESIGN.md)
    max_len: int = 200  # longest input the model sees (200 MovieLens, 50 Amazon)
    r_min: float = 0.8  # smallest initial |λ|: the shortest memory
    r_max: float = 0.99  # largest initial |λ|: the longest memory (~100 steps)
    lr: float = 1e-3  # AdamW learning rate (DESIGN.md)
    weight_decay: float = 0.01  # AdamW decay, on weight matrices and embeddings only
    grad_clip: float = 5.0  # max global grad norm (DESIGN.md)
    batch_size: int = 64  # training windows per step: 18 steps/epoch on ML-100K
    sliding_step: int | None = None  # stride between windows of long sequences; None = max_len
    max_epochs: int = 100  # hard cap; early stopping normally ends training well before
    patience: int = 10  # epochs without a better validation Recall@10 before stopping
    eval_batch_size: int = 256  # users per forward pass when scoring
    # Training loss over the target and this many uniformly drawn items per batch (shared by
    # its positions) instead of the whole catalogue (sampled softmax); None: the full softmax.
    # For catalogues where the full projection dominates an epoch (10x Beauty); scoring and
    # evaluation always rank the whole catalogue.
    sampled_negatives: int | None = None
    seed: int = 42  # seeds init, dropout and shuffling: CPU runs are repeatable

    def __post_init__(self) -> None:
        assert self.n_items >= 1, f"n_items must be >= 1, got {self.n_items}"
        assert 0.0 < self.r_min < self.r_max < 1.0, f"need 0 < r_min < r_max < 1, got {self}"
        assert self.max_len >= 1, f"max_len must be >= 1, got {self.max_len}"
        assert self.sliding_step is None or self.sliding_step >= 1, "sliding_step must be >= 1"
        assert self.sampled_negatives is None or 1 <= self.sampled_negatives < self.n_items, (
            f"sampled_negatives must be in [1, n_items), got {self.sampled_negatives}"
        )


def _scan(lam: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = lam * h_{t-1} + b_t along dim 1, h_{-1} = 0, in ceil(log2 L) vectorised steps.

    Hillis-Steele scan: after the round with offset s, h_t holds the recurrence over the
    last 2s inputs, because the window of s steps before t contributes lam^s * h_{t-s}.
    The update at t only looks at offsets relative to t, and zero inputs stay zero, so any
    number of zero inputs on the left leaves every later state bit-for-bit unchanged.
    """
    h = b.clone()  # (B, L, d)
    length, step, power = h.shape[1], 1, lam  # power = lam ** step, (d,)
    while step < length:
        h[:, step:] += power * h[:, :-step]  # rhs is evaluated before the in-place add
        power = power * power
        step *= 2
    return h


class _LinearScan(torch.autograd.Function):
    """The scan with a hand-written backward: autograd through the in-place rounds would
    zero-fill and copy a (B, L, d) tensor per round, which costs more than the scan itself.

    With PyTorch's conjugate-gradient convention, the adjoint of h_t = lam h_{t-1} + b_t is
    the same recurrence run backwards in time with conj(lam):
    delta_t = g_t + conj(lam) delta_{t+1}; dL/db_t = delta_t; dL/dlam = sum conj(h_{t-1}) delta_t.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, lam: torch.Tensor, b: torch.Tensor):
        h = _scan(lam, b)
        ctx.save_for_backward(lam, h)
        return h

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_h: torch.Tensor):
        lam, h = ctx.saved_tensors
        delta = _scan(lam.conj(), grad_h.flip(1)).flip(1)  # (B, L, d)
        h_prev = F.pad(h[:, :-1], (0, 0, 1, 0))  # (B, L, d): h_{t-1}, zero at t = 0
        return (h_prev.conj() * delta).sum(dim=(0, 1)), delta


def linear_scan(lam: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All states of h_t = lam ⊙ h_{t-1} + b_t: lam (d,) complex, b (B, L, d) complex."""
    assert lam.dim() == 1 and b.dim() == 3 and b.shape[-1] == lam.shape[0], (
        f"lam {tuple(lam.shape)} vs b {tuple(b.shape)}"
    )
    return _LinearScan.apply(lam, b)


class LRULayer(nn.Module):
    """One LRU: complex diagonal recurrence between a complex input and output projection.

    B and C are complex but stored as real Linears over interleaved (re, im) pairs, so that
    view_as_complex / view_as_real switch representations without copies:
    in_proj(x) = [Re(Bx)_0, Im(Bx)_0, Re(Bx)_1, ...] and Re(C h) = out_proj([Re h_0, Im h_0, ...])
    (the minus sign of -Im(C) Im(h) folds into the weight). Parameters are kept as logs
    (ν, θ, γ) as in the LRU paper, so |λ| = exp(-exp(ν_log)) stays in (0, 1) and the
    recurrence stays stable whatever AdamW does; γ starts at sqrt(1 - |λ|²) and is learnt.
    """

    def __init__(self, d_model: int, dropout: float, r_min: float, r_max: float) -> None:
        super().__init__()
        radius = r_min + (r_max - r_min) * torch.rand(d_model)  # |λ| ~ U[r_min, r_max]
        theta = 2 * math.pi * (1.0 - torch.rand(d_model))  # (0, 2π]: keeps log θ finite
        nu_log = torch.log(-torch.log(radius))
        gamma_log = 0.5 * torch.log(1.0 - radius**2)  # γ = sqrt(1 - |λ|²): state keeps scale
        self.params_log = nn.Parameter(torch.stack([nu_log, torch.log(theta), gamma_log]))
        self.in_proj = nn.Linear(d_model, 2 * d_model)  # x -> interleaved (re, im) of Bx
        self.out_proj = nn.Linear(2 * d_model, d_model)  # interleaved (re, im) of h -> Re(Ch)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def lam(self) -> torch.Tensor:
        """(d,) complex λ = exp(-exp(ν_log) + i exp(θ_log))."""
        nu, theta = self.params_log[:2].exp()
        return torch.exp(torch.complex(-nu, theta))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, d), mask (B, L) True on real items, padding on the left -> (B, L, d)."""
        batch, length, d = x.shape
        gamma = self.params_log[2].exp()  # (d,)
        u = self.in_proj(x) * mask[..., None]  # (B, L, 2d): padding -> exactly 0, bias too
        b = torch.view_as_complex(u.view(batch, length, d, 2)) * gamma  # (B, L, d) complex
        h = linear_scan(self.lam(), b)  # (B, L, d) complex; h = 0 until the first real item
        y = self.out_proj(torch.view_as_real(h).reshape(batch, length, 2 * d))  # (B, L, d)
        return self.norm(self.dropout(y) + x)


class PositionwiseFFN(nn.Module):
    """The per-position nonlinearity the linear recurrence lacks."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, 4 * d_model)
        self.w2 = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, d) -> (B, L, d)."""
        y = self.w2(self.dropout(F.gelu(self.w1(x))))  # (B, L, d)
        return self.norm(x + self.dropout(y))


class LRUBlock(nn.Module):
    def __init__(self, config: LRURecConfig) -> None:
        super().__init__()
        c = config
        self.lru = LRULayer(c.d_model, c.dropout, c.r_min, c.r_max)
        self.ffn = PositionwiseFFN(c.d_model, c.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.lru(x, mask))


class LRURec(nn.Module):
    """Item sequence -> hidden state per position -> scores over all items (tied embedding)."""

    def __init__(self, config: LRURecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.item_emb = nn.Embedding(config.n_items + 1, d, padding_idx=0)  # row 0 = padding
        self.emb_dropout = nn.Dropout(config.dropout)
        self.emb_norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(LRUBlock(config) for _ in range(config.n_layers))
        self.item_bias = nn.Parameter(torch.zeros(config.n_items))  # (I,) popularity prior
        self._init_weights()

    def _init_weights(self) -> None:
        """Truncated normal (std 0.02) as in LRURec; LayerNorms and LRU params keep theirs."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) internal ids, 0 = padding -> hidden states (B, L, d)."""
        assert items.dim() == 2, f"items must be (B, L), got {tuple(items.shape)}"
        mask = items > 0  # (B, L)
        # Right or inner padding would let the state decay over pad steps: left only.
        assert bool((mask[:, 1:] >= mask[:, :-1]).all()), "padding (id 0) must be on the left"
        x = self.emb_norm(self.emb_dropout(self.item_emb(items)))  # (B, L, d)
        for block in self.blocks:
            x = block(x, mask)
        return x

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


def save_lrurec(model: LRURec, config: LRURecConfig, directory: str | Path) -> Path:
    """Write model.safetensors + config.json; the tied output uses item_emb, so no duplicates."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    return directory


def load_lrurec(directory: str | Path) -> LRURec:
    """Rebuild the model from a `save_lrurec` directory, in eval mode on CPU."""
    directory = Path(directory)
    config = LRURecConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    model = LRURec(config)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    return model.eval()
