import math
from pathlib import Path

import pytest
import torch

from lkg_pipeline.core.retrieval.lrurec import LRURec, linear_scan
from lkg_pipeline.core.retrieval.seqrec import (
    RetrieverConfig,
    left_pad,
    load_retriever,
    save_retriever,
)


def step_by_step(lam: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The recurrence as written in the paper: one time step at a time."""
    h = torch.zeros_like(b[:, 0])
    states = []
    for t in range(b.shape[1]):
        h = lam * h + b[:, t]
        states.append(h)
    return torch.stack(states, dim=1)


def random_lam(d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    radius = 0.5 + 0.49 * torch.rand(d, dtype=dtype)
    return torch.polar(radius, 2 * math.pi * torch.rand(d, dtype=dtype))


@pytest.mark.parametrize("length", [1, 2, 3, 7, 8, 13, 64, 100])
def test_parallel_scan_equals_step_by_step(length: int) -> None:
    torch.manual_seed(length)
    lam = random_lam(5)
    b = torch.randn(3, length, 5, dtype=torch.complex128)
    torch.testing.assert_close(linear_scan(lam, b), step_by_step(lam, b), rtol=1e-10, atol=1e-10)


def test_parallel_scan_float32_close_to_float64() -> None:
    torch.manual_seed(0)
    lam = random_lam(16)
    b = torch.randn(4, 200, 16, dtype=torch.complex128)
    got = linear_scan(lam.to(torch.complex64), b.to(torch.complex64))
    torch.testing.assert_close(got, step_by_step(lam, b).to(torch.complex64), rtol=1e-4, atol=1e-4)


def test_parallel_scan_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    lam = random_lam(4).requires_grad_()
    b = torch.randn(2, 11, 4, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(linear_scan, (lam, b))


def test_zero_inputs_on_the_left_leave_states_bit_identical() -> None:
    torch.manual_seed(0)
    lam = random_lam(8, torch.float32)
    b = torch.randn(2, 37, 8, dtype=torch.complex64)
    padded = torch.cat([torch.zeros(2, 27, 8, dtype=torch.complex64), b], dim=1)
    assert torch.equal(linear_scan(lam, padded)[:, 27:], linear_scan(lam, b))
    assert not linear_scan(lam, padded)[:, :27].any()


def test_lru_initialisation_ranges() -> None:
    torch.manual_seed(0)
    config = RetrieverConfig(n_items=10, d_model=256)
    layer = LRURec(config).blocks[0].lru
    radius = layer.lam().abs()
    assert radius.min() >= config.r_min - 1e-6 and radius.max() <= config.r_max + 1e-6
    theta = layer.params_log[1].exp()
    assert theta.min() > 0 and theta.max() <= 2 * math.pi + 1e-6
    gamma = layer.params_log[2].exp()
    torch.testing.assert_close(gamma, torch.sqrt(1 - radius**2))


def tiny_model(seed: int = 0, **overrides: object) -> LRURec:
    torch.manual_seed(seed)
    config = RetrieverConfig(n_items=30, d_model=16, max_len=12, **overrides)  # type: ignore[arg-type]
    return LRURec(config).eval()


def test_left_padding_never_changes_scores() -> None:
    model = tiny_model()
    short, long = [3, 7, 1, 29, 0], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    with torch.inference_mode():
        alone = model(left_pad([short], 12))  # (1, I), no padding at all
        in_batch = model(left_pad([short, long], 12))  # short gets 6 pads on the left
        extra = torch.cat([torch.zeros(1, 40, dtype=torch.long), left_pad([short], 12)], dim=1)
        many_pads = model(extra)
    torch.testing.assert_close(in_batch[0], alone[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(many_pads[0], alone[0], rtol=0, atol=1e-6)
    assert torch.equal(in_batch[0].argsort(descending=True), alone[0].argsort(descending=True))


def test_right_padding_is_refused() -> None:
    model = tiny_model()
    with pytest.raises(AssertionError, match="left"):
        model(torch.tensor([[3, 4, 0]]))


def test_left_pad_truncates_to_the_last_items_and_shifts_ids() -> None:
    x = left_pad([[0, 1, 2, 3], [9]], max_len=3)
    assert x.tolist() == [[2, 3, 4], [0, 0, 10]]


def test_save_load_reproduces_scores_exactly(tmp_path: Path) -> None:
    model = tiny_model(seed=3, n_layers=3)
    with torch.no_grad():  # make every parameter non-trivial, the item bias included
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.item_emb.weight[0].zero_()
    items = left_pad([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], 12)
    directory = save_retriever(model, model.config, tmp_path / "lrurec")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_retriever(directory)
    assert loaded.config == model.config
    assert not loaded.training
    with torch.inference_mode():
        assert torch.equal(loaded(items), model(items))
