"""Which torch device a retriever trains and scores on."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str) -> str:
    """ "auto": CUDA when present, else the CPU; "cuda" where there is none: a clear error."""
    if requested not in DEVICES:
        raise ValueError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device here")
    return requested


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
