"""The learnable user preference over KG path types (LKG-RAG step 4): its config, the module that
scores candidates, and how it is saved and loaded.

The reference computes a per-user distribution π_u over relation types but no gradient ever
reaches it. Here π_u scores the 20 candidates of each ranking example from per-type path counts
and is trained with a softmax cross-entropy against the true item (`preference_training`), so
π_u is the weighting of path types that best explains what the user chose next. The prompt
stage then picks paths of the types with the highest π_u.

Score of candidate c for the user u of an example (T path types, n(c, t) paths of type t from
the example's history items to c):

    φ(c, t)  = w_t · log1p(n(c, t)) · idf_t
    idf_t    = log((1 + N) / (1 + df_t)) + 1     (N: training (example, candidate) pairs,
                                                  df_t: those with ≥ 1 path of type t)
    w_t      = softplus(ρ_t) ≥ 0, ρ_t initialised so that w_t = 1
    π_u      = softmax(logits_u)  (user-id embedding, or MLP of the user's history profile)
    s_u(c)   = Σ_t π_u[t] · φ(c, t)

π_u says *which* types matter to this user, w_t how informative a type is for everybody; w also
plays the role of a global temperature (all w_t can grow together), so there is no separate one.
A candidate without paths scores 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from lkg_pipeline.core.paths.preference.grid import PathGrid, history_profiles, row_chunks

UserEncoder = Literal["user_id", "history"]


ENCODERS: tuple[str, ...] = get_args(UserEncoder)


WEIGHTS_FILE = "preference.safetensors"


CONFIG_FILE = "preference.json"


@dataclass(frozen=True)
class PreferenceConfig:
    """Hyperparameters of the preference module and its training loop, saved with it."""

    user_encoder: UserEncoder = "user_id"  # "user_id": the paper's per-user logits; "history": MLP
    hidden: int = 32  # hidden width of the history encoder's MLP (T → hidden → T)
    lr: float = 0.05  # Adam(W) learning rate: the parameters are few and start at 0
    weight_decay: float = 0.0  # AdamW decay on encoder weights; logit_l2 is the main prior
    logit_l2: float = 1e-2  # penalty on mean squared logits: pulls sparse users toward uniform
    epochs: int = 50  # passes over the train split; the best validation epoch is kept
    batch_size: int | None = 512  # examples per step; None = full batch (best val on ML-100K)
    seed: int = 42  # seeds init and shuffling: CPU runs are repeatable

    def __post_init__(self) -> None:
        if self.user_encoder not in ENCODERS:
            raise ValueError(
                f"unknown user_encoder {self.user_encoder!r}; choose one of {ENCODERS}"
            )
        if not (self.hidden >= 1 and self.epochs >= 0 and self.lr > 0):
            raise ValueError(
                f"hidden={self.hidden} must be ≥ 1, epochs={self.epochs} ≥ 0 and lr={self.lr} > 0"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be ≥ 1, or None (one batch)")


class PreferenceModel(nn.Module):
    """π_u from a user encoder, type weights w_t, and the fixed training-set idf_t."""

    def __init__(self, config: PreferenceConfig, path_types: Sequence[str], n_users: int) -> None:
        super().__init__()
        self.config, self.path_types, self.n_users = config, list(path_types), n_users
        t = len(self.path_types)
        assert t >= 1 and n_users >= 1, f"need path types and users, got T={t}, U={n_users}"
        self.register_buffer("idf", torch.ones(t))  # (T,), set by train_preference
        self.type_weight_raw = nn.Parameter(torch.full((t,), math.log(math.e - 1.0)))  # w = 1
        if config.user_encoder == "user_id":
            # sparse gradients, so a step touches only its batch's rows (`_optimizers`);
            # SparseAdam has no weight decay, so a decayed table stays dense
            sparse = config.weight_decay == 0
            self.encoder: nn.Module = nn.Embedding(n_users, t, sparse=sparse)
            nn.init.zeros_(self.encoder.weight)  # uniform π at init, as in the paper
        else:
            self.encoder = nn.Sequential(
                nn.Linear(t, config.hidden), nn.ReLU(), nn.Linear(config.hidden, t)
            )
            nn.init.zeros_(self.encoder[2].weight)  # uniform π at init; the bias learns a prior
            nn.init.zeros_(self.encoder[2].bias)

    def logits(self, users: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        """(B, T) preference logits from the user id or the (B, T) history profile."""
        if self.config.user_encoder == "history":
            return self.encoder(profile)  # (B, T)
        assert bool((users < self.n_users).all()), (
            f"user_idx {int(users.max())} >= n_users={self.n_users}: the user_id encoder knows "
            "no such user (the history encoder serves unseen users)"
        )
        return self.encoder(users)  # (B, T)

    def type_weight(self) -> torch.Tensor:
        """w_t = softplus(ρ_t): non-negative, so more paths of a type never lower a score."""
        return F.softplus(self.type_weight_raw)  # (T,)

    def forward(
        self, users: torch.Tensor, profile: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B, K) with -inf on padding, logits (B, T)) from log1p counts (B, K, T)."""
        logits = self.logits(users, profile)  # (B, T)
        phi = feats * (self.type_weight() * self.idf)  # (B, K, T)
        scores = torch.einsum("bkt,bt->bk", phi, logits.softmax(dim=-1))  # (B, K)
        return scores.masked_fill(~mask, -math.inf), logits


@dataclass
class PreferenceResult:
    """What train_preference learnt, with the evidence that π_u moved and helped."""

    model: PreferenceModel  # holds the best epoch's state
    loss_history: list[dict[str, float]]  # per epoch (0 = init): train loss, val loss/metrics
    best_epoch: int
    best_val_ndcg10: float  # val subset NDCG@10 of best_epoch (NaN without val examples)
    pi_shift: dict[str, float] = field(default_factory=dict)  # KL / TV to uniform, init vs final


def forward_rows(model: PreferenceModel, g: PathGrid, rows: torch.Tensor):
    # index_select, not g.users[rows]: advanced indexing is ~100x slower on a busy 2-core CPU
    users, profile, mask = (x.index_select(0, rows) for x in (g.users, g.profile, g.mask))
    return model(users, profile, g.feats(rows), mask)


@torch.no_grad()
def score_rows(model: PreferenceModel, g: PathGrid, rows: torch.Tensor) -> torch.Tensor:
    """(N, K) scores of grid rows, a chunk at a time; each row's are those of any batch."""
    return torch.cat([forward_rows(model, g, chunk)[0] for chunk in row_chunks(rows)])


@torch.no_grad()
def user_preferences(
    model: PreferenceModel, users: Sequence[int] | None = None, history: pl.DataFrame | None = None
) -> pl.DataFrame:
    """(user_idx, path_type, pi, weight) long table; users=None means 0..n_users-1."""
    assert history is not None or model.config.user_encoder == "user_id", (
        "the history encoder needs the history profile"
    )
    ids = np.arange(model.n_users) if users is None else np.asarray(users, dtype=np.int64)
    pi = model.logits(
        torch.from_numpy(ids).long(), history_profiles(history, model.path_types, ids)
    )
    t = len(model.path_types)
    probs = pi.softmax(dim=-1)  # (U, T)
    # What one path of each type adds to this user's candidate score (before log1p of the
    # count): π_u[t] · w_t · idf_t. Prompts pick paths by it, so a type the user favours but
    # that links almost every pair (a shared country) does not crowd out a shared director.
    weight = probs * (model.type_weight() * model.idf)
    return pl.DataFrame(
        {
            "user_idx": np.repeat(ids, t),
            "path_type": pl.Series(model.path_types).gather(np.tile(np.arange(t), len(ids))),
            "pi": probs.numpy().reshape(-1),
            "weight": weight.numpy().reshape(-1),
        },
        schema={
            "user_idx": pl.Int32,
            "path_type": pl.String,
            "pi": pl.Float32,
            "weight": pl.Float32,
        },
    )


def save_preference(
    result_or_model: PreferenceResult | PreferenceModel,
    config: PreferenceConfig,
    path_types: Sequence[str],
    directory: str | Path,
) -> Path:
    """Write preference.safetensors (incl. idf) + preference.json (config, vocabulary, U)."""
    model = getattr(result_or_model, "model", result_or_model)
    assert config == model.config, f"config {config} is not the model's {model.config}"
    assert list(path_types) == model.path_types, "path_types differ from the model's vocabulary"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {
        "config": dataclasses.asdict(config),
        "path_types": model.path_types,
        "n_users": model.n_users,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_preference(directory: str | Path) -> PreferenceModel:
    """The saved model in eval mode; idf is part of the weights, so scores match exactly."""
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    model = PreferenceModel(PreferenceConfig(**meta["config"]), meta["path_types"], meta["n_users"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    return model.eval()
