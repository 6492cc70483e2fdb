"""Kept start-up measurements: measured once per machine when the CPU is free, reused after."""

from pathlib import Path

import pytest
import torch

from lkg_pipeline.core.llm import precision, probes
from lkg_pipeline.core.llm.precision import choose_dtype


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "probes.json"
    monkeypatch.setenv(probes.PROBE_CACHE_ENV, str(path))
    monkeypatch.setattr(precision, "cpu_flags", lambda: ["avx512_bf16", "avx512f"])
    precision._measured_choice.cache_clear()  # a new process, as far as the choice knows
    yield path
    precision._measured_choice.cache_clear()


def gemm_rates(monkeypatch: pytest.MonkeyPatch, bf16: float, calls: list) -> None:
    def rate(dtype: torch.dtype, *args, **kwargs) -> float:
        calls.append(dtype)
        return {torch.float32: 200.0, torch.bfloat16: bf16}[dtype]

    monkeypatch.setattr(precision, "gemm_gflops", rate)


def test_a_measurement_with_the_cpu_to_itself_is_kept_and_reused(store, monkeypatch) -> None:
    calls: list = []
    gemm_rates(monkeypatch, 400.0, calls)
    monkeypatch.setattr(probes, "MIN_CPU_SHARE", 0.0)  # whatever else runs beside the test
    first = choose_dtype("auto", "cpu", (64, 64, 64))
    assert first.chosen == "bfloat16" and calls and store.exists()
    assert "kept for later runs" in first.reason and first.cpu_share is not None

    # a later process on the same machine: a busy moment now would read bf16 as slower
    precision._measured_choice.cache_clear()
    calls.clear()
    gemm_rates(monkeypatch, 100.0, calls)
    again = choose_dtype("auto", "cpu", (64, 64, 64))
    assert not calls, "the kept measurement was measured again"
    assert again.chosen == "bfloat16" and again.bf16_gflops == 400.0
    assert f"kept measurement of {first.measured_utc}" in again.reason
    assert again.metadata()["dtype_measured_utc"] == first.measured_utc

    # another shape (or thread count, torch, CPU) is another key: measured
    precision._measured_choice.cache_clear()
    other = choose_dtype("auto", "cpu", (32, 64, 64))
    assert calls and other.chosen == "float32"


def test_a_measurement_on_a_busy_cpu_is_used_once_and_not_kept(store, monkeypatch) -> None:
    calls: list = []
    gemm_rates(monkeypatch, 400.0, calls)
    monkeypatch.setattr(probes, "MIN_CPU_SHARE", 1e9)  # no share is enough: always "busy"
    busy = choose_dtype("auto", "cpu", (64, 64, 64))
    assert busy.chosen == "bfloat16"
    assert "another process was busy" in busy.reason and "set `dtype`" in busy.reason
    assert not store.exists()
    precision._measured_choice.cache_clear()
    calls.clear()
    choose_dtype("auto", "cpu", (64, 64, 64))
    assert calls, "a busy measurement must not be reused"


def test_an_unreadable_store_is_reported_and_replaced(store, monkeypatch) -> None:
    gemm_rates(monkeypatch, 400.0, [])
    monkeypatch.setattr(probes, "MIN_CPU_SHARE", 0.0)
    store.write_text("{ half a file")
    with pytest.warns(UserWarning, match="unreadable"):
        choice = choose_dtype("auto", "cpu", (64, 64, 64))
    assert choice.chosen == "bfloat16"
    assert probes._read(store)  # valid again, with the new record
    assert not list(store.parent.glob("*.tmp")), "a temporary file was left behind"


def test_off_measures_every_time_and_keeps_nothing(store, monkeypatch) -> None:
    calls: list = []
    gemm_rates(monkeypatch, 400.0, calls)
    monkeypatch.setattr(probes, "MIN_CPU_SHARE", 0.0)
    monkeypatch.setenv(probes.PROBE_CACHE_ENV, "off")
    assert probes.probe_cache() is None
    choose_dtype("auto", "cpu", (64, 64, 64))
    precision._measured_choice.cache_clear()
    first = len(calls)
    choose_dtype("auto", "cpu", (64, 64, 64))
    assert len(calls) == 2 * first and not store.exists()


def test_the_cpu_share_of_a_real_measurement_is_a_fraction(store) -> None:
    probed = probes.kept_or_measured(
        probes.machine_key("test", 1, n=1), lambda: {"x": sum(range(200_000))}
    )
    assert 0.0 < probed.cpu_share <= 1.5 and probed.result == {"x": sum(range(200_000))}
