from pathlib import Path

import torch

from lkg_pipeline.core.retrieval.sasrec import SASRec
from lkg_pipeline.core.retrieval.seqrec import (
    RetrieverConfig,
    left_pad,
    load_retriever,
    save_retriever,
)


def tiny_sasrec(seed: int = 0, **overrides: object) -> SASRec:
    torch.manual_seed(seed)
    config = RetrieverConfig(
        n_items=30,
        architecture="sasrec",
        d_model=16,
        max_len=12,
        **overrides,  # type: ignore[arg-type]
    )
    return SASRec(config).eval()


def test_a_state_depends_on_earlier_items_only() -> None:
    model = tiny_sasrec()
    seq = torch.tensor([[3, 7, 1, 9, 4, 2]])
    changed = seq.clone()
    changed[0, 4] = 11  # the fifth item differs: states before it must not move
    a, b = model.encode(seq), model.encode(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_left_padding_leaves_the_real_items_states_unchanged() -> None:
    model = tiny_sasrec()
    short, padded = [[2, 5, 8]], [[2, 5, 8], [1, 2, 3, 4, 5, 6, 7]]
    alone = model.encode(left_pad(short, 12))  # (1, 3, d)
    batch = model.encode(left_pad(padded, 12))  # (2, 7, d): the first row has 4 pads
    torch.testing.assert_close(batch[0, 4:], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batch).all()  # padding rows attend to themselves: no NaN


def test_a_prefix_scored_alone_matches_its_step_in_the_full_sequence() -> None:
    model = tiny_sasrec()
    seq = [4, 9, 1, 0, 22, 17]
    full = model.encode(left_pad([seq], 12))[0]  # (6, d)
    for p in range(1, len(seq) + 1):
        alone = model.encode(left_pad([seq[:p]], 12))[0, -1]
        torch.testing.assert_close(alone, full[p - 1], rtol=1e-5, atol=1e-5)


def test_save_and_load_round_trip_keeps_the_architecture(tmp_path: Path) -> None:
    model = tiny_sasrec(n_heads=4)
    save_retriever(model, model.config, tmp_path)
    loaded = load_retriever(tmp_path)
    assert isinstance(loaded, SASRec) and loaded.config == model.config
    x = left_pad([[1, 2, 3], [4, 5]], 12)
    torch.testing.assert_close(loaded(x), model(x))
