"""Fixtures of the LLM-stage tests: a tiny random Llama with a LoRA adapter that matters."""

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lkg_pipeline.core.llm.model import load_base

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_with_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """(base folder, adapter folder, the in-memory PEFT model) with a non-zero LoRA update."""
    from peft import LoraConfig, get_peft_model

    cache = Path(os.environ.get("LKG_TEST_CACHE", REPO / "data_lake" / "cache"))
    model, tokenizer, _ = load_base("tiny-random", cache)
    base = tmp_path_factory.mktemp("base")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # LoRA B starts at zero: give it weights so the adapter matters
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    adapter = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(adapter)
    return base, adapter, peft_model.eval()
