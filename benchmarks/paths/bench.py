"""Path enumeration: our set-based DuckDB joins against one graph search per pair.

The reference (LlamaRec-LKG-RAG) asks its graph database for a path once per (history item,
candidate) pair of every prompt: up to 20 × 20 = 400 queries per example. `enumerate_paths`
solves every distinct item pair once, for all examples together, in a few DuckDB joins. This
benchmark times both on the same graph:

- on the real ml-100k graph, candidates and sequences from the data lake (all examples), with
  networkx standing in for the graph database: `nx.all_simple_paths(cutoff=2)` keeping paths
  whose middle node is an attribute (the same paths ours finds, which is checked), and the
  reference's literal query, `nx.shortest_path` (one path, no hop limit in networkx). The
  per-pair searches are timed on a seeded sample of examples and extrapolated linearly per
  pair, because all of them would take far longer than the benchmark should;
- on synthetic graphs shaped like ML-100K and Amazon Beauty, built by the real KG builder, at
  growing numbers of users, for time per user and peak memory (each size in its own process),
  through `write_paths`, what the `kg_paths` asset runs: a batch of users at a time, straight
  to Parquet, so that memory is bounded by the batch and the inputs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import polars as pl

from benchmarks.harness import (
    child_memory_limit_mb,
    current_rss_mb,
    require_lake,
    run_isolated,
    table,
)
from lkg_pipeline.core.data.ingest import ITEM_COLUMNS
from lkg_pipeline.core.kg.graph import KGConfig, KnowledgeGraph, build_kg
from lkg_pipeline.core.kg.warehouse import read_parquet, write_parquet
from lkg_pipeline.core.paths.enumeration import (
    PathConfig,
    candidate_rows,
    enumerate_paths,
    history_rows,
    write_paths,
)

N_CANDIDATES = 20
# The kg_paths asset's default (PathRunConfig.users_per_batch).
USERS_PER_BATCH = 2_500
# co_rated counts ratings ≥ this (KGConfig.co_rated_min_rating), see Shape.liked_per_user
LIKED = 4.0
# The scaling plot, relative to the folder `run` writes RESULTS.md to (`make bench`: benchmarks/,
# so the plot lands in this topic's folder, benchmarks/paths/)
PLOT = "paths/paths_scaling.png"


@dataclass(frozen=True)
class GraphInputs:
    """Everything `enumerate_paths` reads, as the `kg_paths` asset passes it."""

    examples: pl.DataFrame
    sequences: pl.DataFrame
    entities: pl.DataFrame
    triples: pl.DataFrame
    relations: pl.DataFrame
    n_items: int

    @property
    def n_users(self) -> int:
        return int((self.entities["type"] == "user").sum())

    def enumerate(self, config: PathConfig | None = None) -> Any:
        return enumerate_paths(
            self.examples,
            self.sequences,
            self.entities,
            self.triples,
            self.relations,
            self.n_items,
            config or PathConfig(),
        )


def real_inputs() -> GraphInputs:
    """The ml-100k graph, candidates and sequences that `make run` wrote."""
    lake = require_lake("kg", "candidates", "sequences")
    kg = read_parquet(lake.kg)
    return GraphInputs(
        pl.read_parquet(lake.candidates),
        pl.read_parquet(lake.sequences),
        kg.entities,
        kg.triples,
        kg.relations,
        int((kg.entities["type"] == "item").sum()),  # every item is a node, edges or not
    )


# ----------------------------------------------------------------------------- the reference


def networkx_graph(inputs: GraphInputs) -> nx.Graph:
    """The same graph for networkx: every non-user triple as an edge (inverses collapse into
    one undirected edge), the relation kept as an edge attribute for the answer."""
    first_user, end_user = inputs.n_items, inputs.n_items + inputs.n_users
    kept = inputs.triples.filter(
        ~pl.col("head").is_between(first_user, end_user, closed="left")
        & ~pl.col("tail").is_between(first_user, end_user, closed="left")
    )
    graph = nx.Graph()
    graph.add_nodes_from(range(inputs.n_items))  # items without edges are still nodes
    graph.add_edges_from(
        (h, t, {"relation": r})
        for h, r, t in zip(
            kept["head"].to_list(), kept["relation"].to_list(), kept["tail"].to_list()
        )
    )
    return graph


def reference_all_paths(
    graph: nx.Graph, h: int, c: int, n_items: int
) -> list[tuple[tuple[int, ...], list[str]]]:
    """One per-pair search, as the reference issues it: every path of ≤ 2 hops from h to c that
    is a direct item–item edge or passes through an attribute node, as (nodes, relations)."""
    return [
        (tuple(path), [graph.edges[u, v]["relation"] for u, v in zip(path, path[1:])])
        for path in nx.all_simple_paths(graph, h, c, cutoff=2)
        if len(path) == 2 or path[1] >= n_items
    ]


def reference_shortest_path(graph: nx.Graph, h: int, c: int) -> list[str] | None:
    """The reference's literal query, one shortest path per pair (kept if ≤ 2 hops);
    networkx's bidirectional BFS has no hop limit, so a pair without a short path costs more."""
    try:
        path = nx.shortest_path(graph, h, c)
    except nx.NetworkXNoPath:
        return None
    if len(path) > 3:
        return None
    return [graph.edges[u, v]["relation"] for u, v in zip(path, path[1:])]


def node_paths_ours(inputs: GraphInputs, example_ids: list[int]) -> set[tuple[int, int, int]]:
    """(h, via, c) of every path `enumerate_paths` finds for these examples (no cap); via is
    -1 for a direct item–item edge."""
    subset = dataclasses.replace(
        inputs, examples=inputs.examples.filter(pl.col("example_id").is_in(example_ids))
    )
    paths = subset.enumerate(PathConfig(max_paths_per_pair=10**9)).paths
    return {
        (h, -1 if via is None else via, c)
        for h, via, c in paths.select("history_item_idx", "via", "candidate_item_idx").rows()
    }


def example_pairs(inputs: GraphInputs, history_len: int = PathConfig.history_len) -> pl.DataFrame:
    """(example_id, h, c) for every query the reference makes: each history item × candidate
    of each example, a pair per example even when another example asked the same."""
    hist = history_rows(inputs.examples, inputs.sequences, history_len)
    return (
        hist.select("example_id", h="item_idx")
        .join(
            candidate_rows(inputs.examples).select("example_id", c="candidate_item_idx"),
            on="example_id",
        )
        .filter(pl.col("h") != pl.col("c"))
    )


def compare(
    inputs: GraphInputs, budget_s: float, repeats: int, seed: int = 0, min_examples: int = 2
) -> dict[str, Any]:
    """Ours on every example vs the per-pair searches on a seeded sample, extrapolated.

    The sample is the first examples of a seeded permutation that the all-paths search gets
    through in `budget_s` (at least `min_examples`); the shortest-path search then runs on the
    same pairs. Queries are per example, as the reference issues them: a pair that two examples
    share is searched twice.
    """
    ours = []
    for _ in range(repeats):
        tick = time.perf_counter()
        out = inputs.enumerate()
        ours.append(time.perf_counter() - tick)
    pairs = example_pairs(inputs)
    tick = time.perf_counter()
    graph = networkx_graph(inputs)
    graph_s = time.perf_counter() - tick

    per_example = pairs.partition_by("example_id", as_dict=True, include_key=False)
    order = inputs.examples["example_id"].sample(fraction=1.0, shuffle=True, seed=seed)
    sample_ids: list[int] = []
    sample: list[tuple[int, int]] = []
    all_s, all_found, found_nodes = 0.0, 0, set()
    for example_id in order.to_list():
        if all_s >= budget_s and len(sample_ids) >= min_examples:
            break
        rows = per_example.get((example_id,))
        if rows is None:
            continue
        queries = rows.select("h", "c").rows()
        tick = time.perf_counter()
        answers = [reference_all_paths(graph, h, c, inputs.n_items) for h, c in queries]
        all_s += time.perf_counter() - tick
        sample_ids.append(example_id)
        sample += queries
        for answer in answers:
            all_found += len(answer)
            for nodes, _ in answer:
                found_nodes.add((nodes[0], -1 if len(nodes) == 2 else nodes[1], nodes[-1]))

    tick = time.perf_counter()
    shortest_found = sum(reference_shortest_path(graph, h, c) is not None for h, c in sample)
    shortest_s = time.perf_counter() - tick

    agree = node_paths_ours(inputs, sample_ids) == found_nodes
    ours_s = statistics.median(ours)

    def extrapolated(sample_s: float) -> float:
        return graph_s + sample_s / len(sample) * pairs.height

    return {
        "examples": inputs.examples.height,
        "users": inputs.examples["user_idx"].n_unique(),
        "pairs_all_examples": pairs.height,
        "distinct_item_pairs": int(out.stats["distinct_item_pairs"]),
        "graph_nodes": graph.number_of_nodes(),
        "graph_edges": graph.number_of_edges(),
        "ours_s": ours_s,
        "ours_runs_s": ours,
        "sample_examples": len(sample_ids),
        "sample_pairs": len(sample),
        "networkx_graph_build_s": graph_s,
        "networkx_all_paths_sample_s": all_s,
        "networkx_all_paths_found": all_found,
        "networkx_all_paths_per_pair_ms": 1e3 * all_s / len(sample),
        "networkx_all_paths_extrapolated_s": extrapolated(all_s),
        "networkx_shortest_sample_s": shortest_s,
        "networkx_shortest_found": shortest_found,
        "networkx_shortest_per_pair_ms": 1e3 * shortest_s / len(sample),
        "networkx_shortest_extrapolated_s": extrapolated(shortest_s),
        "speedup_vs_all_paths": extrapolated(all_s) / ours_s,
        "speedup_vs_shortest": extrapolated(shortest_s) / ours_s,
        "same_paths_on_sample": agree,
    }


# ----------------------------------------------------------------------------- synthetic graphs


@dataclass(frozen=True)
class Shape:
    """A dataset's shape: catalogue size, ratings per user and what items are described by."""

    name: str
    kind: str  # "movielens": genres, year, people | "amazon": brand, category tree
    n_items: int
    mean_ratings: float
    min_ratings: int
    candidate_pool: int  # candidates come from the most popular items, as a retriever's do

    @property
    def liked_per_user(self) -> float:
        """Ratings ≥ LIKED per user. The KG builder's co-rating self-join costs Σ liked², so
        ~6 liked items per user keep the builder linear in users (it is not what is timed)."""
        return min(self.mean_ratings, 6.0)


SHAPES = {
    "ml-100k-like": Shape("ml-100k-like", "movielens", 1682, 106.0, 20, 400),
    "beauty-like": Shape("beauty-like", "amazon", 12101, 8.9, 5, 2000),
}
QUICK_ITEMS = {"ml-100k-like": 150, "beauty-like": 300}
GENRES = (
    ("Drama", 25), ("Comedy", 18), ("Action", 8), ("Thriller", 8), ("Romance", 8),
    ("Adventure", 4), ("Children's", 4), ("Crime", 3), ("Sci-Fi", 3), ("Horror", 3),
    ("War", 2), ("Mystery", 2), ("Musical", 2), ("Documentary", 2), ("Animation", 1),
    ("Western", 1), ("Film-Noir", 1), ("Fantasy", 1),
)  # fmt: skip
DEPARTMENTS = ("Skin Care", "Makeup", "Hair Care", "Fragrance", "Bath & Body", "Tools")


def _long_tail(n: int, rng: np.random.Generator, exponent: float = 0.9) -> np.ndarray:
    """Probabilities ∝ (rank + 10)^-exponent in shuffled order: popular heads, long tails."""
    weights = (np.arange(n) + 10.0) ** -exponent
    rng.shuffle(weights)
    return weights / weights.sum()


def synthetic_sequences(
    shape: Shape, n_users: int, popularity: np.ndarray, rng: np.random.Generator
) -> pl.DataFrame:
    """The `sequences` contract: each user's distinct items in order, last two val and test."""
    extra = shape.mean_ratings - shape.min_ratings
    lengths = shape.min_ratings + rng.geometric(1 / (extra + 1), n_users) - 1
    lengths = np.minimum(lengths, shape.n_items // 2)
    draws = (lengths * 1.5).astype(np.int64) + 10  # with replacement, then de-duplicated
    users = np.repeat(np.arange(n_users, dtype=np.int32), draws)
    items = rng.choice(shape.n_items, size=users.size, p=popularity).astype(np.int32)
    liked = rng.random(users.size) < shape.liked_per_user / shape.mean_ratings
    frame = (
        pl.DataFrame({"user_idx": users, "item_idx": items, "liked": liked})
        .unique(["user_idx", "item_idx"], keep="first", maintain_order=True)
        .with_columns(position=pl.int_range(pl.len()).over("user_idx").cast(pl.Int32))
        .join(
            pl.DataFrame({"user_idx": np.arange(n_users, dtype=np.int32), "length": lengths}),
            on="user_idx",
        )
        .filter(pl.col("position") < pl.col("length"))
        .with_columns(n=pl.len().over("user_idx"))
        .filter(pl.col("n") >= 5)  # ≥ 2 train items (a train example), a val and a test item
        # dense again: the KG numbers user nodes n_items + user_idx, attributes after them
        .with_columns(user_idx=(pl.col("user_idx").rank("dense") - 1).cast(pl.Int32))
    )
    return frame.select(
        "user_idx",
        "item_idx",
        user_id=pl.col("user_idx").cast(pl.Int64) + 1,
        item_id=pl.col("item_idx").cast(pl.Int64) + 1,
        rating=pl.when("liked").then(5.0).otherwise(3.0).cast(pl.Float32),
        timestamp=pl.col("user_idx").cast(pl.Int64) * 1_000_000 + pl.col("position"),
        position="position",
        split=pl.when(pl.col("position") == pl.col("n") - 1)
        .then(pl.lit("test"))
        .when(pl.col("position") == pl.col("n") - 2)
        .then(pl.lit("val"))
        .otherwise(pl.lit("train")),
    ).sort("user_idx", "position")


def _pick(rng: np.random.Generator, n_pool: int, k: int, p: np.ndarray | None = None) -> list[int]:
    return rng.choice(n_pool, size=min(k, n_pool), replace=False, p=p).tolist()


def synthetic_items(
    shape: Shape, sequences: pl.DataFrame, rng: np.random.Generator
) -> tuple[pl.DataFrame, pl.DataFrame | None, pl.DataFrame | None]:
    """(items, Freebase links, Freebase triples) in the ingest contracts the KG builder reads.

    ML-100K-like: ~1.7 genres, one year, a director, four actors and a writer per film, people
    drawn with long tails (a few prolific directors). Beauty-like: a long-tailed brand and one
    or two paths down a 3–4-level category tree under one root, which links every item (as
    Amazon's "Beauty" root does).
    """
    n = shape.n_items
    counts = (
        sequences.filter(pl.col("split") == "train")
        .group_by("item_idx")
        .agg(n_train_interactions=pl.len().cast(pl.Int32))
    )
    items = pl.DataFrame(
        {
            "item_idx": np.arange(n, dtype=np.int32),
            "item_id": np.arange(1, n + 1, dtype=np.int64),
            "title": [f"Synthetic item {i}" for i in range(n)],
        }
    )
    links = triples = None
    if shape.kind == "movielens":
        names, weights = zip(*GENRES, strict=True)
        p = np.array(weights, dtype=float) / sum(weights)
        genres = [
            [names[g] for g in _pick(rng, len(names), 1 + rng.binomial(2, 0.36), p)]
            for _ in range(n)
        ]
        recent = rng.random(n) < 0.8
        years = np.where(recent, rng.integers(1985, 1999, n), rng.integers(1930, 1985, n))
        items = items.with_columns(
            genres=pl.Series(genres, dtype=pl.List(pl.String)),
            year=pl.Series(years, dtype=pl.Int32),
        )
        films = [f"m.film{i}" for i in range(n)]
        facts = []
        for relation, prefix, pool, per_film in (
            ("film.film.directed_by", "m.dir", n // 2, 1),
            ("film.film.actor", "m.act", 2 * n, 4),
            ("film.film.written_by", "m.wri", n, 1),
        ):
            people = _long_tail(pool, rng)
            for i in range(n):
                facts += [
                    (films[i], relation, f"{prefix}{j}") for j in _pick(rng, pool, per_film, people)
                ]
        links = pl.DataFrame({"item_id": np.arange(1, n + 1, dtype=np.int64), "entity_id": films})
        triples = pl.DataFrame(facts, schema=["head", "relation", "tail"], orient="row")
    else:
        brands = rng.choice(max(n // 6, 1), size=n, p=_long_tail(max(n // 6, 1), rng))
        paths = []
        for _ in range(n):
            item_paths = []
            for _ in range(1 + int(rng.random() < 0.15)):
                d = rng.integers(len(DEPARTMENTS))
                level3 = f"{DEPARTMENTS[d]} {rng.integers(5)}"
                path = ["Beauty", DEPARTMENTS[d], level3]
                if rng.random() < 0.6:
                    path.append(f"{level3}.{rng.integers(4)}")
                item_paths.append(path)
            paths.append(item_paths)
        items = items.with_columns(
            brand=pl.Series([f"brand {b}" for b in brands]),
            categories=pl.Series(paths, dtype=pl.List(pl.List(pl.String))),
        )
    missing = {c: t for c, t in ITEM_COLUMNS.items() if c not in items.columns}
    items = items.with_columns(pl.lit(None, t).alias(c) for c, t in missing.items())
    items = items.join(counts, on="item_idx", how="left").with_columns(
        pl.col("n_train_interactions").fill_null(0)
    )
    return items, links, triples


def synthetic_examples(
    shape: Shape,
    sequences: pl.DataFrame,
    popularity: np.ndarray,
    rng: np.random.Generator,
    chunk: int = 4096,
) -> pl.DataFrame:
    """The `candidates` contract: a train, a val and a test example per user, as the pipeline
    makes them (last train prefix, train → val, train + val → test), each with 20 distinct
    candidates drawn from the popular items and the target among them."""
    targets = (
        sequences.with_columns(n=pl.len().over("user_idx"))
        .filter(pl.col("position") >= pl.col("n") - 3)
        .select("user_idx", "split", prefix_len="position", target_item_idx="item_idx")
    )
    pool = np.argsort(-popularity)[: min(shape.candidate_pool, shape.n_items)]
    log_p = np.log(popularity[pool] / popularity[pool].sum())
    k = min(N_CANDIDATES, pool.size)
    blocks = []
    for start in range(0, targets.height, chunk):  # Gumbel top-k: k distinct weighted draws
        keys = log_p + rng.gumbel(size=(min(chunk, targets.height - start), pool.size))
        blocks.append(pool[np.argpartition(-keys, k - 1, axis=1)[:, :k]])
    candidates = np.concatenate(blocks) if blocks else np.empty((0, k), dtype=np.int64)
    target = targets["target_item_idx"].to_numpy()
    missing = ~(candidates == target[:, None]).any(axis=1)
    slots = rng.integers(k, size=missing.sum())
    candidates[np.flatnonzero(missing), slots] = target[missing]
    order = pl.col("split").replace_strict({"train": 0, "val": 1, "test": 2}, return_dtype=pl.Int8)
    return (
        targets.with_columns(
            candidate_item_idxs=pl.Series(candidates.astype(np.int32)).cast(pl.List(pl.Int32))
        )
        .sort(order, "user_idx")
        .with_row_index("example_id")
        .with_columns(pl.col("example_id").cast(pl.Int64), pl.col("prefix_len").cast(pl.Int32))
    )


def synthetic_inputs(shape: Shape, n_users: int, seed: int = 0) -> tuple[GraphInputs, dict]:
    """Synthetic raw tables through the real KG builder (`build_kg`), plus candidates."""
    rng = np.random.default_rng(seed)
    popularity = _long_tail(shape.n_items, rng)
    sequences = synthetic_sequences(shape, n_users, popularity, rng)
    items, links, facts = synthetic_items(shape, sequences, rng)
    kg = build_kg(
        items,
        sequences,
        KGConfig(co_rated_min_rating=LIKED),
        entity_links=links,
        entity_triples=facts,
    )
    examples = synthetic_examples(shape, sequences, popularity, rng)
    inputs = GraphInputs(examples, sequences, kg.entities, kg.triples, kg.relations, items.height)
    return inputs, {
        "users": sequences["user_idx"].n_unique(),
        "ratings": sequences.height,
        "triples": kg.triples.height,
        "entities": kg.entities.height,
        "examples": examples.height,
    }


def build_synthetic(shape: str, n_users: int, folder: str, n_items: int | None = None) -> dict:
    """Child process: build one synthetic dataset and store it as the lake stores the real one."""
    spec = SHAPES[shape] if n_items is None else dataclasses.replace(SHAPES[shape], n_items=n_items)
    tick = time.perf_counter()
    inputs, stats = synthetic_inputs(spec, n_users)
    out = Path(folder)
    write_parquet(KnowledgeGraph(inputs.entities, inputs.triples, inputs.relations, {}), out)
    inputs.examples.write_parquet(out / "examples.parquet")
    inputs.sequences.write_parquet(out / "sequences.parquet")
    (out / "meta.json").write_text(json.dumps({"n_items": inputs.n_items}))
    return stats | {"build_s": time.perf_counter() - tick}


def measure_enumerate(folder: str, users_per_batch: int = USERS_PER_BATCH) -> dict:
    """Child process: `write_paths` on a stored dataset, timed, with the RSS it started from
    (the child's peak is added by the runner)."""
    src = Path(folder)
    kg = read_parquet(src)
    examples = pl.read_parquet(src / "examples.parquet")
    sequences = pl.read_parquet(src / "sequences.parquet")
    n_items = json.loads((src / "meta.json").read_text())["n_items"]
    before = current_rss_mb()
    out = src / "paths"
    tick = time.perf_counter()
    stats = write_paths(
        examples,
        sequences,
        kg.entities,
        kg.triples,
        kg.relations,
        n_items,
        out,
        PathConfig(),
        users_per_batch,
    )
    seconds = time.perf_counter() - tick
    return {
        "seconds": seconds,
        "rss_before_mb": before,
        "users_per_batch": users_per_batch,
        "user_batches": int(stats["user_batches"]),
        "distinct_item_pairs": int(stats["distinct_item_pairs"]),
        "item_pair_paths": int(stats["item_pair_paths"]),
        "paths_rows": int(stats["concrete_paths_kept"]),
        "output_mb": sum(f.stat().st_size for f in out.glob("*.parquet")) / 2**20,
    }


def _predict(points: list[tuple[int, float]], n: int) -> float:
    """Linear in users through the last two sizes (proportional from one)."""
    if len(points) == 1:
        return points[0][1] * n / points[0][0]
    (n1, y1), (n2, y2) = points[-2:]
    return y2 + (y2 - y1) / (n2 - n1) * (n - n2)


def scaling(
    time_limits: dict[int, float], quick: bool, memory_limit_mb: float
) -> list[dict[str, Any]]:
    """Each shape at each size (users → seconds `write_paths` may take) in its own
    processes (build, then measure), smallest first.

    A size is skipped when the sizes before it predict it would pass its time limit or the
    memory limit, and stopped when it does; larger sizes are then not tried.
    """
    rows = []
    for name in SHAPES:
        timings: list[tuple[int, float]] = []
        peaks: list[tuple[int, float]] = []
        stopped = ""
        for n_users, time_limit_s in sorted(time_limits.items()):
            row: dict[str, Any] = {"shape": name, "users": n_users}
            rows.append(row)
            if stopped:
                row["status"] = "not run: a smaller size did not fit (above)"
                continue
            if timings:
                t, m = _predict(timings, n_users), _predict(peaks, n_users)
                if t > time_limit_s or m > memory_limit_mb:
                    stopped = (
                        f"the smaller sizes predict ~{t:,.0f} s and ~{m / 1024:,.1f} GiB peak RSS"
                        f" at {n_users:,} users, over the limits ({time_limit_s:.0f} s,"
                        f" {memory_limit_mb / 1024:,.1f} GiB)"
                    )
                    row["status"] = f"not run: {stopped}"
                    continue
            folder = tempfile.mkdtemp(prefix=f"lkg_paths_{name}_{n_users}_")
            try:
                print(f"  paths scaling: {name}, {n_users:,} users …", flush=True)
                build = run_isolated(
                    "benchmarks.paths.bench:build_synthetic",
                    {
                        "shape": name,
                        "n_users": n_users,
                        "folder": folder,
                        "n_items": QUICK_ITEMS[name] if quick else None,
                    },
                    timeout_s=4 * time_limit_s,
                    memory_limit_mb=memory_limit_mb,
                )
                if not build.ok:
                    stopped = f"building the synthetic graph: {build.status} ({build.error[:300]})"
                    row["status"] = stopped
                    continue
                row |= {k: build.result[k] for k in ("ratings", "triples", "examples", "build_s")}
                measured = run_isolated(
                    "benchmarks.paths.bench:measure_enumerate",
                    {"folder": folder, "users_per_batch": 20 if quick else USERS_PER_BATCH},
                    timeout_s=time_limit_s,
                    memory_limit_mb=memory_limit_mb,
                )
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if not measured.ok:
                stopped = f"write_paths: {measured.status} ({measured.error[:300]})"
                row["status"] = stopped
                continue
            result = measured.result
            row |= {
                "status": "ok",
                "seconds": result["seconds"],
                "ms_per_user": 1e3 * result["seconds"] / n_users,
                "peak_rss_mb": measured.peak_rss_mb,
                "rss_before_mb": result["rss_before_mb"],
                "peak_kb_per_user": 1024 * measured.peak_rss_mb / n_users,
                "distinct_item_pairs": result["distinct_item_pairs"],
                "item_pair_paths": result["item_pair_paths"],
                "paths_rows": result["paths_rows"],
                "user_batches": result["user_batches"],
                "users_per_batch": result["users_per_batch"],
                "output_mb": result["output_mb"],
            }
            timings.append((n_users, result["seconds"]))
            peaks.append((n_users, measured.peak_rss_mb))
            print(
                f"    {result['seconds']:.2f} s ({row['ms_per_user']:.3f} ms/user), "
                f"peak RSS {measured.peak_rss_mb:,.0f} MB",
                flush=True,
            )
    return rows


def plot_scaling(rows: list[dict[str, Any]], path: Path) -> None:
    """Time per user and peak memory against users (log x), one line per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in SHAPES:
        done = [r for r in rows if r["shape"] == name and r.get("status") == "ok"]
        users = [r["users"] for r in done]
        (line,) = left.plot(users, [r["ms_per_user"] for r in done], marker="o", label=name)
        per_user = [1024 * r["peak_rss_mb"] / r["users"] for r in done]
        inputs = [1024 * r["rss_before_mb"] / r["users"] for r in done]
        right.plot(users, per_user, marker="o", color=line.get_color(), label=f"{name}: peak")
        right.plot(users, inputs, ls="--", color=line.get_color(), label=f"{name}: inputs loaded")
    left.set(xscale="log", xlabel="users", ylabel="ms per user", title="write_paths time")
    left.set_ylim(bottom=0)  # from zero: one run per size, differences near 0 are noise
    right.set(
        xscale="log",
        yscale="log",
        xlabel="users",
        ylabel="KB per user",
        title="peak RSS per user (whole process)",
    )
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def run(quick: bool, out_dir: Path | None = None) -> dict[str, Any]:
    """Ours vs the per-pair searches, then the synthetic scaling (and its plot, `out_dir / PLOT`).

    quick: a tiny synthetic graph in place of the real one, two tiny sizes, seconds in all.
    """
    if quick:
        inputs, _ = synthetic_inputs(
            dataclasses.replace(SHAPES["ml-100k-like"], n_items=QUICK_ITEMS["ml-100k-like"]), 30
        )
        comparison = compare(inputs, budget_s=0.2, repeats=1)
        # users → seconds write_paths may take
        limits: dict[int, float] = {20: 60, 60: 60}
    else:
        comparison = compare(real_inputs(), budget_s=60, repeats=3)
        # A size runs only if the smaller ones predict it fits its time limit (and memory).
        limits = {1_000: 300, 10_000: 300, 30_000: 300, 100_000: 600, 1_000_000: 1_800}
    c = comparison
    print(
        f"paths, {'synthetic (quick)' if quick else 'real ml-100k'}: {c['examples']:,} examples, "
        f"{c['pairs_all_examples']:,} (example, history item, candidate) pairs\n"
        f"  ours (enumerate_paths): {c['ours_s']:.2f} s for all users\n"
        f"  networkx all paths ≤2 hops: {c['networkx_all_paths_per_pair_ms']:.3f} ms/pair → "
        f"{c['networkx_all_paths_extrapolated_s']:,.0f} s extrapolated "
        f"(×{c['speedup_vs_all_paths']:,.0f})\n"
        f"  networkx shortest_path: {c['networkx_shortest_per_pair_ms']:.3f} ms/pair → "
        f"{c['networkx_shortest_extrapolated_s']:,.0f} s extrapolated "
        f"(×{c['speedup_vs_shortest']:,.0f})\n"
        f"  (networkx timed on {c['sample_examples']} examples = {c['sample_pairs']:,} pairs, "
        f"extrapolated linearly per pair; same paths on the sample: {c['same_paths_on_sample']})",
        flush=True,
    )
    memory_limit_mb = child_memory_limit_mb()
    rows = scaling(limits, quick, memory_limit_mb)
    plot = None
    if out_dir is not None:
        plot = out_dir / PLOT
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_scaling(rows, plot)
    return {
        "comparison": comparison,
        "scaling": rows,
        "time_limits_s": limits,
        "memory_limit_mb": memory_limit_mb,
        "plot": str(plot) if plot else None,
    }


def to_markdown(result: dict[str, Any]) -> str:
    c = result["comparison"]
    per_user = c["users"] or 1
    rows = [
        {
            "approach": "ours: `enumerate_paths` (DuckDB, 2 threads, each distinct pair once)",
            "wall time, all examples": f"{c['ours_s']:.2f} s (median of {len(c['ours_runs_s'])})",
            "per user": f"{1e3 * c['ours_s'] / per_user:.2f} ms",
            "per query pair": f"{1e6 * c['ours_s'] / c['pairs_all_examples']:.2f} µs",
            "ratio": "1",
        },
        {
            "approach": "networkx `all_simple_paths(cutoff=2)` per pair (same paths as ours)",
            "wall time, all examples": f"{c['networkx_all_paths_extrapolated_s']:,.0f} s (extrap.)",
            "per user": f"{1e3 * c['networkx_all_paths_extrapolated_s'] / per_user:,.0f} ms",
            "per query pair": f"{1e3 * c['networkx_all_paths_per_pair_ms']:,.0f} µs",
            "ratio": f"×{c['speedup_vs_all_paths']:,.0f}",
        },
        {
            "approach": "networkx `shortest_path` per pair (the reference's query, one path)",
            "wall time, all examples": f"{c['networkx_shortest_extrapolated_s']:,.1f} s (extrap.)",
            "per user": f"{1e3 * c['networkx_shortest_extrapolated_s'] / per_user:,.0f} ms",
            "per query pair": f"{1e3 * c['networkx_shortest_per_pair_ms']:,.1f} µs",
            "ratio": f"×{c['speedup_vs_shortest']:,.1f}",
        },
    ]
    scaling_rows = []
    for r in result["scaling"]:
        ok = r.get("status") == "ok"
        scaling_rows.append(
            {
                "shape": r["shape"],
                "users": f"{r['users']:,}",
                "ratings": f"{r['ratings']:,}" if "ratings" in r else "",
                "triples": f"{r['triples']:,}" if "triples" in r else "",
                "examples": f"{r['examples']:,}" if "examples" in r else "",
                "distinct pairs": f"{r['distinct_item_pairs']:,}" if ok else "",
                "batches": f"{r['user_batches']:,}" if ok else "",
                "write_paths": f"{r['seconds']:.2f} s" if ok else "",
                "per user": f"{r['ms_per_user']:.3f} ms" if ok else "",
                "peak RSS": f"{r['peak_rss_mb']:,.0f} MB" if ok else "",
                "RSS before": f"{r['rss_before_mb']:,.0f} MB" if ok else "",
                "peak per user": f"{1024 * r['peak_rss_mb'] / r['users']:,.1f} KB" if ok else "",
                "Parquet out": f"{r['output_mb']:,.0f} MB" if ok else "",
                "status": r.get("status", ""),
            }
        )
    text = [
        "## Path enumeration (`benchmarks/paths/bench.py`)",
        "",
        f"Real ml-100k graph ({c['graph_nodes']:,} non-user nodes, {c['graph_edges']:,} "
        f"undirected edges), {c['examples']:,} examples of {c['users']:,} users (train, val and "
        f"test), {c['pairs_all_examples']:,} (example, history item, candidate) queries, "
        f"{c['distinct_item_pairs']:,} distinct item pairs.",
        "",
        table(rows),
        "",
        f"networkx was timed on a seeded sample of {c['sample_examples']} examples "
        f"({c['sample_pairs']:,} pairs: {c['networkx_all_paths_sample_s']:.1f} s for all paths, "
        f"{c['networkx_shortest_sample_s']:.2f} s for shortest paths) and extrapolated linearly "
        f"per pair to all {c['pairs_all_examples']:,}, plus building the graph once "
        f"({c['networkx_graph_build_s']:.2f} s). On the sample, networkx and `enumerate_paths` "
        f"found {'the same' if c['same_paths_on_sample'] else 'DIFFERENT'} (history item, via, "
        "candidate) node paths. networkx runs on one core, DuckDB on two.",
        "",
        "### Scaling on synthetic graphs",
        "",
        "Built by the real `build_kg` from synthetic raw tables: ml-100k-like (1,682 items, ~106 "
        "ratings per user, ~1.7 genres, a year, a director, four actors and a writer per item) "
        "and beauty-like (12,101 items, ~9 ratings per user, a brand and a 3–4-level category "
        "tree). Three examples per user with 20 popular candidates each, as the pipeline makes. "
        "Timed: `write_paths`, what the `kg_paths` asset runs (a batch of "
        f"{USERS_PER_BATCH:,} users at a time, DuckDB → Parquet, the three tables complete on "
        "disk at the end). Each size runs in its own process; peak RSS is that process's "
        "high-water mark (`VmHWM`), including the inputs it loaded (RSS before: the graph, "
        "sequences and examples, which grow with the users). Limits: "
        + ", ".join(f"{int(u):,} users {t:.0f} s" for u, t in result["time_limits_s"].items())
        + f" for `write_paths`, {result['memory_limit_mb'] / 1024:,.1f} GiB RSS (70% of "
        "the memory available at the start, at most 16 GiB); a size the smaller ones predict "
        "to pass a limit is not run.",
        "",
        table(scaling_rows),
    ]
    if result.get("plot"):
        text += ["", f"![paths scaling]({PLOT})"]
    return "\n".join(text)
