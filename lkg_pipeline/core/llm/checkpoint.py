"""The base model saved as a plain checkpoint folder that training and ranking load alike."""

import json
import re
from pathlib import Path
from typing import Any


def folder_name(source: str) -> str:
    """A source (a name, a Hugging Face id, a path) as one safe folder name, one per source."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_")


def parameter_count(model: Any) -> int:
    """Every weight of the model: what says which model a run actually used."""
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: Any, tokenizer: Any, provenance: dict, folder: Path) -> None:
    """Weights, tokenizer and where they came from in one folder, so they are replaced together."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=2))
