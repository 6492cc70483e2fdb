"""LRURec: linear recurrent units for sequential recommendation (Yue et al., 2024).

A diagonal complex linear recurrence has no nonlinearity across time, so the whole sequence
can be computed with an associative (parallel) scan in log2(L) vectorised steps instead of
a Python loop over time; that is what makes training on 2 CPU cores cheap. The model sees
only item ids (no positional embedding): the recurrence itself encodes order. Scoring, ids
and storage are the retriever families' common ones (`seqrec`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lkg_pipeline.core.retrieval.seqrec import RetrieverConfig, SequentialRecommender


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
    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        c = config
        self.lru = LRULayer(c.d_model, c.dropout, c.r_min, c.r_max)
        self.ffn = PositionwiseFFN(c.d_model, c.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.lru(x, mask))


class LRURec(SequentialRecommender):
    """Item embedding -> dropout -> LayerNorm -> LRU blocks; scores from the base class."""

    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__(config)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.emb_norm = nn.LayerNorm(config.d_model)
        self.blocks = nn.ModuleList(LRUBlock(config) for _ in range(config.n_layers))
        self._init_weights()

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) internal ids, 0 = padding -> hidden states (B, L, d)."""
        mask = self.padding_mask(items)  # (B, L)
        x = self.emb_norm(self.emb_dropout(self.item_emb(items)))  # (B, L, d)
        for block in self.blocks:
            x = block(x, mask)
        return x
