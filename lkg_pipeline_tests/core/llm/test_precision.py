"""The dtype policy: explicit choices are honoured, `auto` measures, and the tiny model trains
and ranks in both types through the real code paths."""

import pytest
import torch

from lkg_pipeline.core.llm import precision, probes
from lkg_pipeline.core.llm.precision import MIN_GEMM_SPEEDUP, choose_dtype, gemm_gflops


def test_explicit_choices_and_cuda_need_no_measurement(monkeypatch) -> None:
    monkeypatch.setattr(precision, "gemm_gflops", lambda *a, **k: pytest.fail("measured"))
    assert choose_dtype("float32").torch_dtype is torch.float32
    assert choose_dtype("bfloat16").torch_dtype is torch.bfloat16
    assert choose_dtype("auto", "cuda").chosen == "bfloat16"
    with pytest.raises(ValueError, match="unknown dtype 'fp16'"):
        choose_dtype("fp16")


@pytest.mark.parametrize(("bf16_rate", "chosen"), [(100.0, "float32"), (400.0, "bfloat16")])
def test_auto_takes_bf16_only_when_it_measures_clearly_faster(
    monkeypatch, bf16_rate: float, chosen: str
) -> None:
    rates = {torch.float32: 200.0, torch.bfloat16: bf16_rate}
    monkeypatch.setattr(precision, "gemm_gflops", lambda dtype, *a, **k: rates[dtype])
    monkeypatch.setattr(precision, "cpu_flags", lambda: ["avx512_bf16", "avx512f"])
    monkeypatch.setenv(probes.PROBE_CACHE_ENV, "off")  # each rate measured, none kept
    precision._measured_choice.cache_clear()
    choice = choose_dtype("auto", "cpu", (64, 64, 64))
    precision._measured_choice.cache_clear()
    assert choice.chosen == chosen
    assert choice.gemm_speedup == pytest.approx(bf16_rate / 200.0)
    assert f"×{MIN_GEMM_SPEEDUP}" in choice.reason
    meta = choice.metadata()
    assert meta["dtype_chosen"] == chosen and meta["cpu_flags"] == "avx512_bf16 avx512f"


def test_auto_stays_fp32_without_a_bf16_unit(monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: ["avx2", "fma"])
    monkeypatch.setattr(precision, "gemm_gflops", lambda *a, **k: pytest.fail("measured"))
    choice = choose_dtype("auto", "cpu")
    assert choice.chosen == "float32" and "no AVX-512 BF16" in choice.reason


def test_gemm_measurement_is_a_positive_rate() -> None:
    assert gemm_gflops(torch.float32, (32, 32, 32), seconds=0.01) > 0
    assert gemm_gflops(torch.bfloat16, (32, 32, 32), seconds=0.01) > 0
