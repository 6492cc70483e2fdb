"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018).

The second retriever family, a standard peer for LRURec: causal self-attention over item
embeddings plus learned positions, post-LayerNorm blocks as in RecBole's implementation
(hidden 64, 2 layers, 2 heads, FFN 4d with GELU). Written here rather than taken from RecBole
because installing RecBole drags in ray and a dozen more packages (DESIGN.md §2), and the
model is ~60 lines on top of the family's shared base (`seqrec`).

Positions count from the first real item of the input (0, 1, 2, ...), not from the padded
array's start, so the hidden state at step t depends only on items 0..t: scoring a prefix on
its own gives the state the full window has at that step (what `retrieval._prefix_scores`
relies on), as LRURec's recurrence does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lkg_pipeline.core.retrieval.seqrec import RetrieverConfig, SequentialRecommender


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, L, d), allowed (B, 1, L, L) True where query may attend key -> (B, L, d)."""
        batch, length, d = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, L, d/h)
        return self.out(y.transpose(1, 2).reshape(batch, length, d))


class TransformerBlock(nn.Module):
    """Post-LN block: x = LN(x + drop(attn(x))); x = LN(x + drop(FFN(x)))."""

    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        d = config.d_model
        self.attn = CausalSelfAttention(d, config.n_heads, config.dropout)
        self.attn_norm = nn.LayerNorm(d)
        self.w1 = nn.Linear(d, 4 * d)
        self.w2 = nn.Linear(4 * d, d)
        self.ffn_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, allowed)))
        y = self.w2(self.dropout(F.gelu(self.w1(x))))
        return self.ffn_norm(x + self.dropout(y))


class SASRec(SequentialRecommender):
    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__(config)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.emb_norm = nn.LayerNorm(config.d_model)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self._init_weights()

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """items (B, L) internal ids, 0 = padding -> hidden states (B, L, d)."""
        mask = self.padding_mask(items)  # (B, L)
        length = items.shape[1]
        assert length <= self.config.max_len, f"input of {length} > max_len {self.config.max_len}"
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, L): 0 at the first real item
        x = self.item_emb(items) + self.pos_emb(positions) * mask[..., None]
        x = self.emb_norm(self.emb_dropout(x))  # (B, L, d)
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        # A query attends to earlier real items and always to itself: a padding row then has
        # one key (no all-masked softmax, no NaN), and its output is never read.
        eye = torch.eye(length, dtype=torch.bool, device=items.device)
        allowed = ((causal & mask[:, None, :]) | eye)[:, None]  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, allowed)
        return x
