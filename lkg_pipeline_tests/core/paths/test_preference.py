import dataclasses
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal

from benchmarks.paths.bench import QUICK_ITEMS, SHAPES, synthetic_inputs
from lkg_pipeline.core.paths.enumeration import PathConfig, write_paths
from lkg_pipeline.core.paths.preference import grid as preference_grid
from lkg_pipeline.core.paths.preference import ranking as preference_ranking
from lkg_pipeline.core.paths.preference.grid import read_grid, read_path_types
from lkg_pipeline.core.paths.preference.model import (
    ENCODERS,
    PreferenceConfig,
    PreferenceResult,
    load_preference,
    save_preference,
    user_preferences,
)
from lkg_pipeline.core.paths.preference.ranking import (
    evaluate_rankings,
    example_ranks,
    preference_ranks,
    rank_metrics,
    retriever_ranks,
    score_examples,
)
from lkg_pipeline.core.paths.preference.training import (
    choose_encoder,
    choose_encoder_on_grid,
    train_on_grid,
    train_preference,
)

TYPES = ["also_bought", "co_rated", "directed_by", "has_genre", "starring"]
N_USERS = 60
CONFIG = PreferenceConfig(epochs=30, batch_size=128, seed=7)

EXAMPLE_SCHEMA = {
    "example_id": pl.Int64,
    "user_idx": pl.Int32,
    "split": pl.String,
    "target_item_idx": pl.Int32,
    "candidate_item_idxs": pl.List(pl.Int32),
    "in_candidates": pl.Boolean,
}
FEATURE_SCHEMA = {
    "example_id": pl.Int64,
    "candidate_item_idx": pl.Int32,
    "path_type": pl.String,
    "n_paths": pl.Int32,
}
HISTORY_SCHEMA = {"user_idx": pl.Int32, "path_type": pl.String, "weight": pl.Float32}


def planted_data(
    users: range = range(N_USERS), n_items: int = 40, k: int = 20, n_train: int = 8, seed: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """User u prefers type u % 5: the target always has 2–3 paths of it; negatives have many
    paths of two other types (so a uniform π ranks them first) and sometimes 1 path of the
    preferred type. The history profile points at the preferred type, with noise."""
    rng = np.random.default_rng(seed)
    examples, features, history = [], [], []
    for u in users:
        liked = u % len(TYPES)
        others = [t for t in range(len(TYPES)) if t != liked]
        for split in ["train"] * n_train + ["val", "test"]:
            eid = len(examples)
            candidates = [int(c) for c in rng.choice(n_items, size=k, replace=False)]
            target = candidates[int(rng.integers(k))]
            for c in candidates:
                if c == target:
                    features.append((eid, c, TYPES[liked], int(rng.integers(2, 4))))
                    continue
                if rng.random() < 0.15:
                    features.append((eid, c, TYPES[liked], 1))
                for t in rng.choice(others, size=2, replace=False):
                    if rng.random() < 0.7:
                        features.append((eid, c, TYPES[t], int(rng.integers(1, 7))))
            examples.append((eid, u, split, target, candidates, True))
        for t in range(len(TYPES)):
            history.append((u, TYPES[t], 5.0 if t == liked else float(rng.integers(0, 2))))
    return (
        pl.DataFrame(examples, schema=EXAMPLE_SCHEMA, orient="row"),
        pl.DataFrame(features, schema=FEATURE_SCHEMA, orient="row"),
        pl.DataFrame(history, schema=HISTORY_SCHEMA, orient="row"),
    )


@pytest.fixture(scope="module")
def data() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    return planted_data()


@pytest.fixture(scope="module")
def trained(data) -> dict[str, PreferenceResult]:
    return {
        name: train_preference(
            *data, TYPES, N_USERS, dataclasses.replace(CONFIG, user_encoder=name)
        )
        for name in ENCODERS
    }


def argmax_types(prefs: pl.DataFrame) -> dict[int, str]:
    top = prefs.sort("user_idx", "pi", descending=[False, True]).group_by("user_idx").first()
    return dict(zip(top["user_idx"].to_list(), top["path_type"].to_list(), strict=True))


@pytest.mark.parametrize("encoder", ENCODERS)
def test_learns_planted_preference(data, trained, encoder: str) -> None:
    examples, features, history = data
    result = trained[encoder]
    top = argmax_types(user_preferences(result.model, None, history))
    share = np.mean([top[u] == TYPES[u % len(TYPES)] for u in range(N_USERS)])
    assert share >= 0.9, f"π_u peaks on the planted type for only {share:.0%} of users"
    assert result.pi_shift["kl_init"] < 1e-6 and result.pi_shift["kl_final"] > 0.5
    assert result.pi_shift["tv_final"] > result.pi_shift["tv_init"]
    assert result.best_epoch > 0 and result.best_val_ndcg10 >= 0.9
    assert [e["epoch"] for e in result.loss_history] == list(range(CONFIG.epochs + 1))
    assert result.loss_history[-1]["loss"] < result.loss_history[0]["loss"]

    uniform = train_preference(
        examples, features, history, TYPES, N_USERS, dataclasses.replace(CONFIG, epochs=0)
    )
    learned = evaluate_rankings(examples, score_examples(result.model, examples, features, history))
    baseline = evaluate_rankings(
        examples, score_examples(uniform.model, examples, features, history)
    )
    for split in ("val", "test"):
        mrr1 = learned[split]["subset"]["MRR@1"]
        assert mrr1 >= 0.9, f"{split} MRR@1 {mrr1}"
        assert mrr1 - baseline[split]["subset"]["MRR@1"] >= 0.5, (learned[split], baseline[split])


def test_scores_cover_every_candidate(data, trained) -> None:
    examples, features, history = data
    scores = score_examples(trained["user_id"].model, examples, features, history)
    assert scores.height == int(examples["candidate_item_idxs"].list.len().sum())
    pathless = scores.join(
        features.select("example_id", "candidate_item_idx").unique(),
        on=["example_id", "candidate_item_idx"],
        how="anti",
    )
    assert pathless.height > 0 and (pathless["score"] == 0).all()


def test_history_encoder_serves_unseen_user(data, trained) -> None:
    _, _, history = data
    new_user = N_USERS + 3  # beyond the user-id embedding; only a history profile is known
    examples, features, new_history = planted_data(users=range(new_user, new_user + 1), seed=5)
    liked = TYPES[new_user % len(TYPES)]
    model = trained["history"].model
    prefs = user_preferences(model, [new_user], new_history)
    assert argmax_types(prefs) == {new_user: liked}
    scores = score_examples(model, examples, features, new_history)
    assert evaluate_rankings(examples, scores)["test"]["subset"]["MRR@1"] == 1.0

    with pytest.raises(AssertionError, match="history encoder serves unseen users"):
        user_preferences(trained["user_id"].model, [new_user])
    empty = history.clear()  # no profile at all: the history encoder falls back to its prior
    assert user_preferences(model, [new_user], empty)["pi"].sum() == pytest.approx(1.0)


def test_same_seed_same_run(data, trained) -> None:
    examples, features, history = data
    config = dataclasses.replace(CONFIG, user_encoder="history")
    again = train_preference(examples, features, history, TYPES, N_USERS, config)
    first = trained["history"]
    assert again.loss_history == first.loss_history
    assert_frame_equal(
        score_examples(again.model, examples, features, history),
        score_examples(first.model, examples, features, history),
    )
    other = train_preference(
        examples, features, history, TYPES, N_USERS, dataclasses.replace(config, seed=8)
    )
    assert other.loss_history != first.loss_history


def test_save_load_round_trip(tmp_path: Path, data, trained) -> None:
    examples, features, history = data
    for name, result in trained.items():
        directory = save_preference(result, result.model.config, TYPES, tmp_path / name)
        loaded = load_preference(directory)
        assert_frame_equal(
            score_examples(loaded, examples, features, history),
            score_examples(result.model, examples, features, history),
        )


def test_choose_encoder(data) -> None:
    examples, features, history = data
    config = dataclasses.replace(CONFIG, epochs=5)
    choice = choose_encoder(examples, features, history, TYPES, N_USERS, config)
    assert set(choice.val_ndcg10) == set(ENCODERS)
    assert choice.val_ndcg10[choice.encoder] == max(choice.val_ndcg10.values())
    assert choice.best.model.config.user_encoder == choice.encoder


def test_evaluate_rankings_known_ranks() -> None:
    examples = pl.DataFrame(
        [
            (1, 0, "val", 11, [10, 11, 12], True),  # rank 1
            (2, 1, "val", 22, [20, 21, 22], True),  # all tied: rank 3 (candidate order)
            (3, 2, "val", 99, [30, 31, 32], False),  # target not a candidate: miss
            (4, 0, "test", 41, [40, 41], True),  # rank 2
            (5, 0, "train", 50, [50, 51], True),  # ignored
        ],
        schema=EXAMPLE_SCHEMA,
        orient="row",
    )
    scores = pl.DataFrame(
        {
            "example_id": [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 5, 5],
            "candidate_item_idx": [10, 11, 12, 20, 21, 22, 30, 31, 32, 40, 41, 50, 51],
            "score": [0.5, 0.9, 0.1, 0.3, 0.3, 0.3, 1.0, 2.0, 3.0, 0.7, 0.2, 0.0, 0.0],
        }
    )
    out = evaluate_rankings(examples, scores, ks=(1, 5))
    subset, overall = out["val"]["subset"], out["val"]["overall"]
    assert subset["n_examples"] == 2 and overall["n_examples"] == 3
    assert subset["MRR@1"] == pytest.approx(0.5)
    assert subset["MRR@5"] == pytest.approx((1 + 1 / 3) / 2)
    assert subset["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 2)
    assert overall["Recall@5"] == pytest.approx(2 / 3)
    assert overall["NDCG@5"] == pytest.approx((1 + 0.5) / 3)
    assert out["test"]["subset"]["MRR@5"] == pytest.approx(0.5)
    assert out["test"]["overall"]["Recall@1"] == 0.0
    with pytest.raises(AssertionError, match="misses"):
        evaluate_rankings(examples, scores.filter(pl.col("candidate_item_idx") != 21))


def test_contract_violations(data) -> None:
    examples, features, history = data
    bogus = features.head(3).with_columns(path_type=pl.lit("bogus_relation"))
    with pytest.raises(ValueError, match="bogus_relation"):
        train_preference(examples, pl.concat([features, bogus]), history, TYPES, N_USERS, CONFIG)
    bad_history = history.head(1).with_columns(path_type=pl.lit("weird"))
    with pytest.raises(ValueError, match="weird"):
        score_examples(
            train_preference(examples.head(20), features, history, TYPES, N_USERS, CONFIG).model,
            examples,
            features,
            bad_history,
        )
    with pytest.raises(ValueError, match="user_id"):
        PreferenceConfig(user_encoder="gnn")
    with pytest.raises(ValueError, match=r"unknown split values .*'holdout'"):
        train_preference(
            examples.with_columns(split=pl.lit("holdout")), features, history, TYPES, N_USERS
        )


def test_history_profiles_follow_the_requested_users(data) -> None:
    """Profiles are looked up by a sorted search: any order of users, users without history
    (zeros), a history of users nobody asked for (ignored), a user asked for twice."""
    _, _, history = data
    known = history["user_idx"].unique().sort().to_numpy()
    users = np.array([known[3], 10_000, known[0], known[3], known[1]])
    profiles = preference_grid.history_profiles(history, TYPES, users).numpy()
    for i, user in enumerate(users):
        rows = history.filter(pl.col("user_idx") == user)
        expected = np.zeros(len(TYPES))
        for path_type, weight in rows.select("path_type", "weight").rows():
            expected[TYPES.index(path_type)] += weight
        total = expected.sum()
        np.testing.assert_allclose(profiles[i], expected / total if total else expected, 1e-6)
    assert profiles[1].sum() == 0 and np.array_equal(profiles[0], profiles[3])
    assert preference_grid.history_profiles(history, TYPES, np.zeros(0, dtype=np.int64)).shape == (
        0,
        5,
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Beauty-like synthetic examples with their path tables as kg_paths writes them."""
    folder = tmp_path_factory.mktemp("paths")
    spec = dataclasses.replace(SHAPES["beauty-like"], n_items=QUICK_ITEMS["beauty-like"])
    inputs, _ = synthetic_inputs(spec, 40)
    graph = (inputs.entities, inputs.triples, inputs.relations, inputs.n_items)
    write_paths(inputs.examples, inputs.sequences, *graph, folder, PathConfig(), 7)
    features = pl.read_parquet(folder / "pair_features.parquet")
    history = pl.read_parquet(folder / "history_profile.parquet")
    return {
        "folder": folder,
        "examples": inputs.examples,
        "tables": (features, history),
        "path_types": sorted(set(features["path_type"]) | set(history["path_type"])),
        "n_users": int(inputs.examples["user_idx"].max()) + 1,
    }


def assert_same_result(a: PreferenceResult, b: PreferenceResult) -> None:
    assert a.loss_history == b.loss_history and a.pi_shift == b.pi_shift
    assert (a.best_epoch, a.model.config) == (b.best_epoch, b.model.config)
    ours, theirs = a.model.state_dict(), b.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "weights differ"


def in_list_order(examples: pl.DataFrame) -> pl.DataFrame:
    """Scores falling along each candidate list: the retriever's own order."""
    return (
        examples.select(
            "example_id",
            candidate_item_idx="candidate_item_idxs",
            score=pl.int_ranges(pl.col("candidate_item_idxs").list.len()).list.eval(-pl.element()),
        )
        .explode("candidate_item_idx", "score")
        .with_columns(pl.col("score").cast(pl.Float32))
    )


@pytest.mark.parametrize("users_per_batch", [3, 16, 1000])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_batches_of_users_train_and_rank_as_the_whole_tables(
    written: dict, encoder: str, users_per_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit for bit: read a batch of users at a time and passed over in chunks of rows, the
    path tables give the loss history, weights and ranks of the in-memory frames."""
    examples, folder, (features, history) = [written[k] for k in ("examples", "folder", "tables")]
    path_types, n_users = written["path_types"], written["n_users"]
    config = PreferenceConfig(user_encoder=encoder, epochs=4, batch_size=32, seed=3)
    whole = train_preference(examples, features, history, path_types, n_users, config)

    assert read_path_types(folder) == path_types
    for module in (preference_grid, preference_ranking):  # 40 train rows: two chunks
        monkeypatch.setattr(module, "CHUNK_ROWS", 32)
    grid = read_grid(examples, folder, path_types, users_per_batch)
    assert set(grid.split_names()) == {"train", "val"} and grid.counts.dtype == np.uint8
    assert grid.mask.shape[0] == examples.filter(pl.col("split") != "test").height
    assert grid.user_ids.tolist() == examples["user_idx"].unique().sort().to_list()
    batched = train_on_grid(grid, n_users, config)
    assert_same_result(whole, batched)

    scores = score_examples(whole.model, examples, features, history)
    assert_frame_equal(scores, score_examples(batched.model, examples, features, history))
    ranked = preference_ranks(batched.model, examples, folder, users_per_batch)
    assert_frame_equal(ranked, example_ranks(examples, scores))
    evaluated = preference_ranks(batched.model, examples, folder, users_per_batch, ("val", "test"))
    assert set(evaluated["split"]) == {"val", "test"}
    assert rank_metrics(evaluated) == evaluate_rankings(examples, scores)
    order = retriever_ranks(examples, ("val", "test"))
    assert rank_metrics(order) == evaluate_rankings(examples, in_list_order(examples))
    assert_frame_equal(
        retriever_ranks(examples),
        example_ranks(examples, in_list_order(examples)),
    )


def test_both_encoders_train_on_one_grid(written: dict) -> None:
    examples, folder, tables = written["examples"], written["folder"], written["tables"]
    path_types, n_users = written["path_types"], written["n_users"]
    config = PreferenceConfig(epochs=3, batch_size=32)
    whole = choose_encoder(examples, *tables, path_types, n_users, config)
    grid = read_grid(examples, folder, path_types, 5)
    batched = choose_encoder_on_grid(grid, n_users, config)
    assert (batched.encoder, batched.val_ndcg10) == (whole.encoder, whole.val_ndcg10)
    assert_same_result(whole.best, batched.best)


def write_tables(folder: Path, examples, features, history) -> Path:
    """The frames as kg_paths' files: pair_features with its user_idx, users ascending."""
    folder.mkdir(parents=True, exist_ok=True)
    features = features.join(examples.select("example_id", "user_idx"), on="example_id")
    features.sort("user_idx").write_parquet(folder / "pair_features.parquet")
    history.sort("user_idx").write_parquet(folder / "history_profile.parquet")
    return folder


def test_compact_counts_decode_to_the_float32_features(tmp_path: Path, data) -> None:
    """Exact integer counts, log1p'd per chunk, are the float32 log1p(n_paths) grid that
    duplicate rows add up in; a count beyond uint8 (or uint16) widens the counts, nothing
    else."""
    examples, features, history = data
    duplicate = features.head(1)  # the same (example, candidate, type) twice: counts add up
    lists = examples.select("example_id", "candidate_item_idxs").rows()
    position = {(e, c): (i, k) for i, (e, cs) in enumerate(lists) for k, c in enumerate(cs)}
    for extra, dtype in (
        (duplicate, np.uint8),
        (duplicate.with_columns(n_paths=300), np.uint16),
        (duplicate.with_columns(n_paths=70_000), np.uint32),
    ):
        rows = pl.concat([features, extra])
        folder = write_tables(tmp_path / str(dtype.__name__), examples, rows, history)
        grid = read_grid(examples, folder, TYPES, 7, splits=None)
        assert grid.counts.dtype == dtype
        expected = np.zeros((examples.height, 20, len(TYPES)), dtype=np.float32)
        for e, c, t, n in rows.rows():
            expected[(*position[(e, c)], TYPES.index(t))] += np.float32(n)
        decoded = grid.feats(torch.arange(examples.height))
        assert torch.equal(decoded, torch.from_numpy(np.log1p(expected)))
    first = features.row(0)
    i, k = position[first[:2]]
    assert int(grid.counts[i, k, TYPES.index(first[2])]) == first[3] + 70_000


def test_user_table_steps_update_only_the_batch_rows(data) -> None:
    """The user_id encoder learns through lazy (sparse) Adam, so a step costs its batch, not
    every user (dense AdamW made the stage grow as users²); with weight decay it keeps dense
    AdamW, and both still learn the planted preferences."""
    from lkg_pipeline.core.paths.preference.model import PreferenceModel
    from lkg_pipeline.core.paths.preference.training import _optimizers

    config = dataclasses.replace(CONFIG, user_encoder="user_id")
    model = PreferenceModel(config, TYPES, N_USERS)
    sparse, weights = _optimizers(model, config)
    assert isinstance(sparse, torch.optim.SparseAdam)
    model.logits(torch.tensor([1, 3]), torch.zeros(2, len(TYPES))).sum().backward()
    grad = model.encoder.weight.grad
    assert grad.is_sparse and set(grad.coalesce().indices()[0].tolist()) == {1, 3}
    before = model.encoder.weight.detach().clone()
    sparse.step()
    moved = (model.encoder.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == [1, 3]

    decayed = dataclasses.replace(config, weight_decay=1e-3)
    dense = _optimizers(PreferenceModel(decayed, TYPES, N_USERS), decayed)
    assert [type(o) for o in dense] == [torch.optim.AdamW]
    result = train_preference(*data, TYPES, N_USERS, decayed)
    assert result.best_val_ndcg10 >= 0.9
