"""Which floating-point type the LLM stages compute in: bf16 where this machine runs it faster.

The right answer differs between the machines this project runs on (DESIGN.md §2): with AMX
a bf16 GEMM of SmolLM2's shape runs several times the fp32 rate (3.3× on an Intel Xeon), with
AVX-512 BF16 alone it gains less, and a CPU without a bf16 unit runs bf16 tens of times slower
(per machine: benchmarks/README.md#fp32-and-bf16). So
`auto` never assumes: on a CPU it times one GEMM of the model's own shape in both types (well
under a second) and takes bf16 only when it is clearly faster; the measurement is kept per
machine (core.llm.probes) so that a busy moment cannot flip it. On CUDA bf16 is always the
faster type for these models.

Weights are stored in fp32 whatever is chosen (the checkpoint and the adapter keep one
format); the choice only decides what the frozen weights are cast to after loading. LoRA
weights stay fp32 under training (peft's `autocast_adapter_dtype`), so the optimiser keeps
fp32 master weights and the published adapter has the same format in both types.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from lkg_pipeline.core.llm.probes import cpu_flags, cpu_model, kept_or_measured, machine_key

DtypeName = Literal["auto", "float32", "bfloat16"]
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# bf16 must beat fp32 by this much on the GEMM to be chosen: a whole forward gains less than
# its GEMMs (norms, rotary, attention softmax and casts do not speed up), measured here as
# about two thirds of the GEMM's gain, so a marginal GEMM win would be a loss end to end.
MIN_GEMM_SPEEDUP = 1.3
# One projection of SmolLM2-135M (576 → 1536, the MLP's up/gate) on a 512-token prompt.
DEFAULT_GEMM_SHAPE = (512, 576, 1536)


def gemm_gflops(
    dtype: torch.dtype,
    shape: tuple[int, int, int] = DEFAULT_GEMM_SHAPE,
    seconds: float = 0.15,
    device: str = "cpu",
) -> float:
    """GFLOP/s of `x @ w` with x (m, k) and w (k, n) in `dtype`, timed for about `seconds`.

    One untimed call first: oneDNN picks and JIT-compiles its kernel on the first use of a shape.
    """
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
    w = torch.randn(k, n, generator=generator).to(device=device, dtype=dtype)
    x @ w
    calls, start = 0, time.perf_counter()
    while True:
        x @ w
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            break
    return 2.0 * m * k * n * calls / elapsed / 1e9


@dataclass(frozen=True)
class DtypeChoice:
    """The type the LLM computes in, and the evidence it was chosen on."""

    requested: str  # auto | float32 | bfloat16
    chosen: str  # float32 | bfloat16
    device: str
    reason: str
    cpu_model: str
    cpu_flags: tuple[str, ...]
    fp32_gflops: float | None = None  # the start-up GEMM (CPU `auto` only)
    bf16_gflops: float | None = None
    cpu_share: float | None = None  # of the process while it measured (core.llm.probes)
    measured_utc: str | None = None  # now, or when the kept measurement was taken

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.chosen]

    @property
    def gemm_speedup(self) -> float | None:
        if self.fp32_gflops and self.bf16_gflops:
            return self.bf16_gflops / self.fp32_gflops
        return None

    def metadata(self) -> dict[str, Any]:
        """Flat, JSON-ready: what the log and the materialisation metadata show."""
        out = asdict(self)
        out["cpu_flags"] = " ".join(self.cpu_flags) or "(none of the bf16 flags)"
        out["gemm_speedup"] = self.gemm_speedup
        named = {f"dtype_{k}" if not k.startswith("cpu") else k: v for k, v in out.items()}
        return {k: v for k, v in named.items() if v is not None}  # rates: `auto` on CPU only

    def describe(self) -> str:
        return f"computing in {self.chosen} on {self.device} ({self.reason})"


def choose_dtype(
    requested: str = "auto",
    device: str = "cpu",
    shape: tuple[int, int, int] = DEFAULT_GEMM_SHAPE,
) -> DtypeChoice:
    """The compute type for `requested` on `device`; `auto` measures on CPUs (cached per process).

    An explicit `bfloat16` is honoured even where it is slow (the caller asked), with the
    reason saying so.
    """
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPES)}")
    flags = tuple(cpu_flags())
    model = cpu_model()
    if requested != "auto":
        return DtypeChoice(requested, requested, device, "requested", model, flags)
    if device.startswith("cuda"):
        return DtypeChoice(requested, "bfloat16", device, "CUDA: bf16 tensor cores", model, flags)
    if not ({"avx512_bf16", "amx_bf16"} & set(flags)):
        return DtypeChoice(
            requested,
            "float32",
            device,
            "no AVX-512 BF16 or AMX: bf16 would be emulated",
            model,
            flags,
        )
    return _measured_choice(device, shape, torch.get_num_threads(), model, flags)


@functools.lru_cache(maxsize=8)
def _measured_choice(
    device: str,
    shape: tuple[int, int, int],
    threads: int,  # part of the cache key: the ratio depends on it
    model: str,
    flags: tuple[str, ...],
) -> DtypeChoice:
    def measure() -> dict[str, Any]:
        # Alternating rounds, best of each: the first GEMMs of a process also wake the thread
        # pool (seen here: one fp32 round at 38 GFLOP/s, the next at 190), which would bias one.
        rates: dict[torch.dtype, float] = {torch.float32: 0.0, torch.bfloat16: 0.0}
        for _ in range(3):
            for dtype in rates:
                rates[dtype] = max(rates[dtype], gemm_gflops(dtype, shape, 0.05, device))
        return {"fp32_gflops": rates[torch.float32], "bf16_gflops": rates[torch.bfloat16]}

    key = machine_key("gemm_dtype", threads, device=device, shape=shape)
    probed = kept_or_measured(key, measure)
    fp32, bf16 = probed.result["fp32_gflops"], probed.result["bf16_gflops"]
    ratio = bf16 / fp32
    chosen = "bfloat16" if ratio >= MIN_GEMM_SPEEDUP else "float32"
    reason = (
        f"measured GEMM {shape[0]}×{shape[1]}→{shape[2]} on {threads} threads: bf16 "
        f"{bf16:.0f} vs fp32 {fp32:.0f} GFLOP/s (×{ratio:.2f}; bf16 needs ×{MIN_GEMM_SPEEDUP}); "
        + probed.note(threads, "dtype")
    )
    return DtypeChoice("auto", chosen, device, reason, model, flags, fp32, bf16,
                       probed.cpu_share, probed.measured_utc)  # fmt: skip


def model_gemm_shape(config: Any, tokens: int = 512) -> tuple[int, int, int]:
    """The MLP up-projection of a Hugging Face model config, on `tokens` tokens."""
    hidden = int(getattr(config, "hidden_size", DEFAULT_GEMM_SHAPE[1]))
    inner = int(getattr(config, "intermediate_size", DEFAULT_GEMM_SHAPE[2]))
    return (tokens, hidden, inner)
