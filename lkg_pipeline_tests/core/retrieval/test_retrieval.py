import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from lkg_pipeline.core.evaluate.metrics import rank_of_target
from lkg_pipeline.core.retrieval.candidates import (
    held_out_training_candidates,
    retrieve_candidates,
    training_candidates,
)
from lkg_pipeline.core.retrieval.device import resolve_device
from lkg_pipeline.core.retrieval.ranking import (
    evaluate_model,
    evaluate_scores,
    popularity_report,
    rank_users,
    retriever_report,
    score_users,
    top_k,
)
from lkg_pipeline.core.retrieval.seqrec import (
    RetrieverConfig,
    SequentialRecommender,
    build_retriever,
)
from lkg_pipeline.core.retrieval.sequences import UserSequences, user_sequences
from lkg_pipeline.core.retrieval.training import train_retriever


def long_frame(seqs: list[list[int]]) -> pl.DataFrame:
    """The `sequences` contract from per-user item lists (last two items = val, test)."""

    def split(pos: int, n: int) -> str:
        return "test" if pos == n - 1 else "val" if pos == n - 2 else "train"

    rows = [
        (u, item, 1000 * u + pos, pos, split(pos, len(s)))
        for u, s in enumerate(seqs)
        for pos, item in enumerate(s)
    ]
    return pl.DataFrame(
        rows,
        schema={
            "user_idx": pl.Int32,
            "item_idx": pl.Int32,
            "timestamp": pl.Int64,
            "position": pl.Int32,
            "split": pl.String,
        },
        orient="row",
    )


def random_data(n_users: int = 12, n_items: int = 60, seed: int = 0) -> UserSequences:
    rng = np.random.default_rng(seed)
    seqs = [
        rng.choice(n_items, size=int(rng.integers(5, 26)), replace=False).tolist()
        for _ in range(n_users)
    ]
    return user_sequences(long_frame(seqs), n_items=n_items)


def random_model(
    n_items: int = 60, max_len: int = 8, seed: int = 0, architecture: str = "lrurec"
) -> SequentialRecommender:
    torch.manual_seed(seed)
    config = RetrieverConfig(
        n_items=n_items,
        d_model=16,
        max_len=max_len,
        architecture=architecture,  # type: ignore[arg-type]
    )
    return build_retriever(config).eval()


def test_user_sequences_groups_by_position() -> None:
    frame = long_frame([[4, 2, 9, 1], [0, 3, 5]]).sample(fraction=1.0, shuffle=True, seed=1)
    data = user_sequences(frame)
    assert data.train == [[4, 2], [0]]
    assert data.val.tolist() == [9, 3] and data.test.tolist() == [1, 5]
    assert data.n_items == 10
    inputs, targets = data.inputs("test")
    assert inputs == [[4, 2, 9], [0, 3]] and targets.tolist() == [1, 5]


def test_user_sequences_rejects_a_user_without_test_row() -> None:
    frame = long_frame([[4, 2, 9, 1], [0, 3, 5]]).filter(
        ~((pl.col("user_idx") == 1) & (pl.col("split") == "test"))
    )
    with pytest.raises(AssertionError, match="test"):
        user_sequences(frame)


def test_no_history_item_is_ever_a_candidate() -> None:
    data, model = random_data(), random_model()
    scores = score_users(model, data.train)
    for u, seq in enumerate(data.train):
        assert torch.isinf(scores[u, seq]).all()
        assert torch.isfinite(scores[u]).sum() == data.n_items - len(set(seq))
    top = retrieve_candidates(model, data, k=20).top_k
    for (u, split), group in top.group_by("user_idx", "split"):
        history = set(data.train[u]) | ({int(data.val[u])} if split == "test" else set())
        assert not history & set(group["item_idx"].to_list())
        assert sorted(group["rank"].to_list()) == list(range(1, 21))


@pytest.mark.parametrize("k", [1, 7, 20])
def test_top_k_is_the_head_of_a_stable_descending_sort_under_ties(k: int) -> None:
    # Scores from five values, so most of the k-th values are tied across the boundary.
    generator = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 5, (64, 300), generator=generator).float()
    scores[torch.rand(64, 300, generator=generator) < 0.3] = float("-inf")  # masked history
    scores[0, :] = 2.0  # a row that is one big tie
    scores[32:] = torch.rand(32, 300, generator=generator)  # rows without ties: the fast path
    scores[40, 100] = 1e30  # a top score that ties nothing
    values, indices = top_k(scores, k)
    expected = torch.sort(scores, dim=1, descending=True, stable=True)
    assert torch.equal(indices, expected.indices[:, :k])
    assert torch.equal(values, expected.values[:, :k])
    assert indices[0].tolist() == list(range(k))


def test_top_k_refuses_a_row_with_fewer_than_k_unseen_items() -> None:
    scores = torch.zeros((2, 10))
    scores[1, 3:] = float("-inf")
    with pytest.raises(AssertionError, match="fewer than k=4"):
        top_k(scores, 4)


def test_rank_users_in_batches_equals_ranking_the_whole_matrix() -> None:
    data, model = random_data(n_users=30, n_items=60), random_model(max_len=8)
    inputs, targets = data.inputs("test")
    whole = score_users(model, inputs)
    values, items = top_k(whole, 20)
    ranks = rank_of_target(whole, torch.as_tensor(targets), tie_break="index").numpy()
    ranked = rank_users(model, inputs, 20, targets)  # score_users' batches: the same floats
    assert torch.equal(ranked.items, items) and torch.equal(ranked.values, values)
    assert ranked.target_ranks is not None and (ranked.target_ranks == ranks).all()
    for batch_size in (1, 7):  # other padding: the same ranking, scores to rounding
        ranked = rank_users(model, inputs, 20, targets, batch_size)
        assert torch.equal(ranked.items, items)
        torch.testing.assert_close(ranked.values, values, rtol=0, atol=1e-6)
        assert ranked.target_ranks is not None and (ranked.target_ranks == ranks).all()
    assert rank_users(model, inputs, 5).target_ranks is None
    assert evaluate_model(model, inputs, targets) == evaluate_scores(whole, targets)
    assert not model.training


def test_candidates_contain_the_target_exactly_as_often_as_coverage_says() -> None:
    data, model = random_data(n_users=40, n_items=45), random_model(n_items=45)
    cands = retrieve_candidates(model, data, k=20)
    report = retriever_report(model, data)
    hits = cands.top_k.join(
        cands.targets,
        left_on=["user_idx", "split", "item_idx"],
        right_on=["user_idx", "split", "target_item_idx"],
    )
    for split in ("val", "test"):
        targets = cands.targets.filter(pl.col("split") == split)
        found = hits.filter(pl.col("split") == split)
        assert 0 < len(found) < len(targets), "fixture should have hits and misses"
        assert len(found) / len(targets) == pytest.approx(report[split]["coverage@20"])
        assert report[split]["coverage@20"] == pytest.approx(report[split]["Recall@20"])
        assert targets["in_candidates"].sum() == len(found)
        # Where the target was retrieved, its full-ranking rank is its place in the list.
        assert (found["rank"] == found["target_rank"]).all()
        assert (targets.filter(~pl.col("in_candidates"))["target_rank"] > 20).all()


def test_popularity_baseline_counts_train_items_and_breaks_ties_by_index() -> None:
    seqs = [[0, 1, 5, 6], [0, 1, 2, 3], [0, 2, 4, 7], [1, 2, 3, 0]]
    data = user_sequences(long_frame(seqs), n_items=8)
    # Train counts: item 0 x3, item 1 x3, item 2 x2, the rest 0 (ties -> lower index first).
    # val ranks: user 0 (seen 0,1): 2, 3, 4, [5] -> 4; user 1 (seen 0,1): [2] -> 1;
    # user 2 (seen 0,2): 1, 3, [4] -> 3; user 3 (seen 1,2): 0, [3] -> 2.
    report = popularity_report(data, ks=(1, 5), k=2)
    assert report["val"]["Recall@1"] == pytest.approx(1 / 4)
    assert report["val"]["MRR@5"] == pytest.approx((1 / 4 + 1 + 1 / 3 + 1 / 2) / 4)
    assert report["val"]["coverage@2"] == pytest.approx(2 / 4)


@pytest.mark.parametrize("architecture", ["lrurec", "sasrec"])
def test_tiny_model_overfits_a_tiny_dataset(architecture: str) -> None:
    # Users walk the cycle 0 -> 1 -> ... -> 39 -> 0 from different starts: the next item is a
    # pure function of the current one, and val/test (the next two steps) follow the rule.
    seqs = [[(start + t) % 40 for t in range(12)] for start in range(0, 40, 5)]
    data = user_sequences(long_frame(seqs), n_items=40)
    config = RetrieverConfig(
        n_items=40,
        architecture=architecture,  # type: ignore[arg-type]
        d_model=32,
        n_layers=1,
        dropout=0.0,
        lr=1e-2,
        batch_size=2,
        max_epochs=15,
        patience=15,
        seed=0,
    )
    result = train_retriever(data, config)
    prefixes = [s[:p] for s in data.train for p in range(1, len(s))]
    targets = np.array([s[p] for s in data.train for p in range(1, len(s))])
    train_fit = evaluate_scores(score_users(result.model, prefixes), targets, ks=(1,), k=1)
    assert train_fit["Recall@1"] >= 0.9
    assert result.best_val["Recall@1"] >= 0.9
    assert result.history[-1]["loss"] < 0.2 * result.history[0]["loss"]
    assert not result.model.training


def test_sampled_softmax_is_cross_entropy_over_the_target_and_the_drawn_items() -> None:
    from lkg_pipeline.core.retrieval.training import _sampled_softmax_loss

    model = random_model(n_items=60)
    hidden = torch.randn(5, 16)
    target = torch.tensor([3, 7, 7, 0, 59])
    loss = _sampled_softmax_loss(model, hidden, target, 8, torch.Generator().manual_seed(4))
    negatives = torch.randint(0, 60, (8,), generator=torch.Generator().manual_seed(4))
    full = model.item_scores(hidden)  # (5, 60)
    expected = []
    for row in range(5):  # by hand: the target's score against the drawn others
        others = [full[row, j] for j in negatives.tolist() if j != target[row]]
        logits = torch.stack([full[row, target[row]], *others])
        expected.append(-torch.log_softmax(logits, 0)[0])
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_a_sampled_softmax_still_learns_a_tiny_dataset() -> None:
    seqs = [[(start + t) % 40 for t in range(12)] for start in range(0, 40, 5)]
    data = user_sequences(long_frame(seqs), n_items=40)
    config = RetrieverConfig(
        n_items=40, d_model=32, n_layers=1, dropout=0.0, lr=1e-2, batch_size=2,
        max_epochs=30, patience=30, seed=0, sampled_negatives=8,
    )  # fmt: skip
    result = train_retriever(data, config)
    assert result.best_val["Recall@1"] >= 0.9
    assert train_retriever(data, config).history == result.history  # seeded draws


def test_training_is_deterministic_on_cpu() -> None:
    data = random_data(n_users=16, n_items=40)
    config = RetrieverConfig(
        n_items=40, d_model=16, max_len=8, batch_size=4, max_epochs=3, patience=3, seed=7
    )
    logged: list[dict[str, float]] = []
    first = train_retriever(data, config, on_log=logged.append)
    second = train_retriever(data, config)
    assert first.history == second.history == logged
    assert len(first.history) == 3 and first.history[-1]["step"] == first.n_steps
    best = max(first.history, key=lambda r: (r["val_Recall@10"], r["val_NDCG@10"]))
    assert first.best_epoch == best["epoch"]
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    other = train_retriever(data, dataclasses.replace(config, seed=8))
    assert other.history != first.history


@pytest.mark.parametrize("policy", ["random", "retriever"])
def test_training_candidates_shape(policy: str) -> None:
    data, model = random_data(), random_model(max_len=8)
    frame = training_candidates(data, policy, model=model, seed=3)  # type: ignore[arg-type]
    n_expected = sum(len(s) - 1 for s in data.train)
    assert len(frame) == n_expected
    for row in frame.iter_rows(named=True):
        cands, target = row["candidate_item_idxs"], row["target_item_idx"]
        assert len(cands) == 20 and len(set(cands)) == 20
        assert cands.count(target) == 1
        assert target == data.train[row["user_idx"]][row["prefix_len"]]
        seen = set(data.train[row["user_idx"]])
        if policy == "random":
            assert set(cands) & seen == {target}
        else:
            assert not set(cands) & set(data.train[row["user_idx"]][: row["prefix_len"]])
    again = training_candidates(data, policy, model=model, seed=3)  # type: ignore[arg-type]
    assert frame.equals(again)
    assert not frame.equals(training_candidates(data, policy, model=model, seed=4))  # type: ignore[arg-type]


@pytest.mark.parametrize("architecture", ["lrurec", "sasrec"])
def test_retriever_candidates_are_the_retrievers_top_items(architecture: str) -> None:
    data = random_data()
    model = random_model(max_len=8, architecture=architecture)  # prefixes up to 23 > max_len
    frame = training_candidates(data, "retriever", model=model, examples_per_user=6)
    assert frame.group_by("user_idx").len()["len"].max() == 6
    prefixes = [data.train[u][:p] for u, p in zip(frame["user_idx"], frame["prefix_len"])]
    assert max(map(len, prefixes)) > 8
    top = torch.sort(score_users(model, prefixes), dim=1, descending=True, stable=True).indices
    for i, row in enumerate(frame.iter_rows(named=True)):
        expected = set(top[i, :20].tolist())
        if row["target_item_idx"] not in expected:
            expected = (expected - {top[i, 19].item()}) | {row["target_item_idx"]}
        assert set(row["candidate_item_idxs"]) == expected


def test_retriever_training_candidates_carry_their_scores_and_the_targets_rank() -> None:
    data, model = random_data(), random_model(max_len=8)
    frame = training_candidates(data, "retriever", model=model, examples_per_user=6)
    prefixes = [data.train[u][:p] for u, p in zip(frame["user_idx"], frame["prefix_len"])]
    scores = score_users(model, prefixes)  # (N, I), the prefix masked
    targets = torch.tensor(frame["target_item_idx"].to_list())
    ranks = rank_of_target(scores, targets, tie_break="index")
    assert frame["target_rank"].to_list() == ranks.tolist()
    assert 0 < (frame["target_rank"] > 20).sum() < frame.height  # both kinds of row occur
    for i, row in enumerate(frame.iter_rows(named=True)):
        expected = scores[i, row["candidate_item_idxs"]].tolist()  # under each item, in order
        assert row["candidate_scores"] == pytest.approx(expected, rel=1e-6)
    uniform = training_candidates(data, "random", model=model, examples_per_user=6)
    assert uniform["candidate_scores"].null_count() == uniform["target_rank"].null_count()
    assert uniform["target_rank"].null_count() == uniform.height


def test_held_out_training_candidates_are_scored_by_retrievers_that_never_saw_them() -> None:
    data = random_data(n_users=12, n_items=60)
    config = RetrieverConfig(n_items=60, d_model=16, max_len=8, batch_size=4, max_epochs=2, seed=1)
    logged: list[dict[str, float]] = []
    frame = held_out_training_candidates(
        data, config, n_candidates=20, examples_per_user=2, seed=3, on_log=logged.append
    )
    assert len(logged) == 2 * 2  # two retrievers of two epochs
    assert frame.height == 2 * data.n_users
    assert frame.select("user_idx", "prefix_len").is_unique().all()
    for shift in (1, 2):
        # independently: a retriever trained on every sequence cut before its s-th last item,
        # early-stopped on that item, scores the prefix that predicts it
        cut = UserSequences(
            train=[s[: len(s) - shift] for s in data.train],
            val=np.array([s[-shift] for s in data.train]),
            test=np.array([s[-1] if shift == 2 else int(v) for s, v in zip(data.train, data.val)]),
            n_items=60,
        )
        model = train_retriever(cut, config).model
        rows = frame.join(
            pl.DataFrame(
                {"user_idx": range(data.n_users), "n": [len(s) for s in data.train]},
                schema={"user_idx": pl.Int32, "n": pl.Int64},
            ),
            on="user_idx",
        ).filter(pl.col("prefix_len") == pl.col("n") - shift)
        assert rows.height == data.n_users
        scores = score_users(
            model, [data.train[u][:p] for u, p in rows.select("user_idx", "prefix_len").iter_rows()]
        )
        targets = torch.tensor(rows["target_item_idx"].to_list())
        assert targets.tolist() == [data.train[u][-shift] for u in rows["user_idx"]]
        assert rows["target_rank"].to_list() == rank_of_target(scores, targets, "index").tolist()
        for i, row in enumerate(rows.iter_rows(named=True)):
            expected = scores[i, row["candidate_item_idxs"]].tolist()
            assert row["candidate_scores"] == pytest.approx(expected, rel=1e-6)
            assert row["target_item_idx"] in row["candidate_item_idxs"]
    retrieved = held_out_training_candidates(
        data, config, n_candidates=20, examples_per_user=2, seed=3, retrieved_only=True
    )
    assert retrieved.equals(frame.filter(pl.col("target_rank") <= 20))
    assert 0 < retrieved.height < frame.height


def test_the_device_setting_resolves_or_says_why_not() -> None:
    has_cuda = torch.cuda.is_available()
    assert resolve_device("auto") == ("cuda" if has_cuda else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not has_cuda:
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_retriever_on_cuda_ranks_as_on_the_cpu() -> None:
    data = random_data(n_users=16, n_items=40)
    config = RetrieverConfig(n_items=40, d_model=16, max_len=8, batch_size=4, max_epochs=2, seed=7)
    on_cpu = train_retriever(data, config).model
    on_gpu = train_retriever(data, config, device="cuda").model
    assert next(on_gpu.parameters()).is_cuda
    for name, tensor in on_cpu.state_dict().items():
        assert torch.allclose(tensor, on_gpu.state_dict()[name].cpu(), atol=1e-4), name
    cpu_top = retrieve_candidates(on_cpu, data, k=10).top_k
    gpu_top = retrieve_candidates(on_gpu, data, k=10).top_k
    assert (cpu_top["item_idx"] == gpu_top["item_idx"]).mean() > 0.95


def test_training_candidates_unknown_policy() -> None:
    with pytest.raises(ValueError, match="random"):
        training_candidates(random_data(), "popular")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ({"grad_clip": 0.0}, "grad_clip must be > 0"),  # froze training
        ({"grad_clip": -1.0}, "grad_clip must be > 0"),  # trained it backwards
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"eval_batch_size": 0}, "eval_batch_size must be >= 1"),  # failed after an epoch
        ({"n_heads": 0}, "n_heads must be >= 1"),
        ({"d_model": 0, "patience": 0}, "d_model must be >= 1.*patience must be >= 1"),
        ({"r_min": 0.99, "r_max": 0.5}, "r_min < r_max"),
    ],
)
def test_a_retriever_setting_that_cannot_train_is_refused_naming_it(
    setting: dict, says: str
) -> None:
    with pytest.raises(ValueError, match=f"retriever config: .*{says}"):
        RetrieverConfig(n_items=60, **setting)


def test_a_diverged_retriever_fails_instead_of_scoring_perfectly() -> None:
    """NaN scores ranked every target first: a diverged model was kept as the best epoch."""
    data = random_data()
    config = RetrieverConfig(n_items=data.n_items, lr=1e6, max_epochs=3, max_len=10, d_model=8)
    # The loss or the validation scores, whichever turns first
    with pytest.raises(FloatingPointError, match="diverged in epoch|have a NaN score"):
        train_retriever(data, config)
    with pytest.raises(FloatingPointError, match="2 of 2 targets have a NaN score"):
        rank_of_target(torch.full((2, 5), float("nan")), torch.tensor([0, 3]))


def test_train_retrieved_is_none_where_no_train_example_has_a_retriever_rank() -> None:
    from lkg_pipeline.core.retrieval.stats import train_retrieved

    data, model = random_data(), random_model(max_len=8)
    uniform = training_candidates(data, "random", model=model, seed=3)
    assert uniform["target_rank"].null_count() == uniform.height
    table = uniform.with_columns(split=pl.lit("train"))
    assert train_retrieved(table, 20) is None  # not 0.0: nothing was retrieved
    ranked = pl.DataFrame({"split": ["train", "train", "val"], "target_rank": [3, 40, 1]})
    assert train_retrieved(ranked, 20) == 0.5
    assert train_retrieved(ranked.filter(pl.col("split") == "val"), 20) is None
