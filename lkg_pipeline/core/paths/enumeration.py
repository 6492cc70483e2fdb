"""Relation paths from a user's recent history to each candidate, for all users at once.

The reference issues one Neo4j shortestPath query per (history item, candidate) pair, up to 420
per prompt. Here every path is found by a handful of set-based joins in DuckDB: paths depend only
on the (history item, candidate) *item pair*, so each distinct pair is solved once and the
results are joined back to every example that needs it.

Paths never pass through a user node (behaviour reaches items through `co_rated`), so a hub of
raters cannot explode the output, and attribute hubs (a genre shared by hundreds of films) are
kept in the per-type counts but sampled last as concrete paths: a shared director says more
than a shared genre. Path types are the relation of the first edge ("directed_by",
"co_rated", …); they are what the preference module weighs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from lkg_pipeline.core.io.storage import concatenate_parquet
from lkg_pipeline.core.paths.batches import read_users, user_batches

PATH_SETTINGS_FILE = "settings.json"  # the PathConfig, beside the tables write_paths makes


@dataclass(frozen=True)
class PathConfig:
    history_len: int = 20  # last H items of each example's input history (the reference's 20)
    max_hops: int = 2  # 1: item–item relations; 2: + item → attribute → item; 3: + one item step
    three_hop_max_degree: int = 20  # 3-hop paths only through attribute nodes this rare
    max_paths_per_pair: int = 3  # concrete paths kept per (example, history item, candidate)
    max_attribute_degree: int | None = None  # ignore attribute nodes linking more items (None: all)

    def __post_init__(self) -> None:
        if self.history_len < 1:
            raise ValueError(f"history_len={self.history_len} must be ≥ 1")
        if self.max_hops not in (1, 2, 3):
            raise ValueError(f"max_hops={self.max_hops}: paths of 1, 2 or 3 hops are implemented")
        if self.max_paths_per_pair < 1:
            raise ValueError("max_paths_per_pair must be ≥ 1")


@dataclass
class Paths:
    paths: pl.DataFrame  # concrete, capped: one row per kept path
    # (example_id, candidate_item_idx, path_type, n_paths, user_idx): all paths; user_idx lets
    # readers take a batch of users (`read_users`)
    pair_features: pl.DataFrame
    # (user_idx, path_type, weight): path types linking consecutive items of the user's training
    # histories, never a target, so the history encoder sees no answer
    history_profile: pl.DataFrame
    stats: dict[str, float | int] = field(default_factory=dict)


# The graph side, once per connection: item → attribute edges (with the attribute's degree)
# and item → item edges.
GRAPH_SQL = """
create temp table node_degree as
    select tail as node, count(distinct head) as degree from triples
    where head < $n_items and tail >= $n_items + $n_users group by tail;

create temp table attr_edges as
    select t.head as item, t.relation, t.tail as node, d.degree
    from triples t
    join node_degree d on d.node = t.tail
    where t.head < $n_items and t.tail >= $n_items + $n_users
      and ($max_degree is null or d.degree <= $max_degree);

create temp table attr_with_inverse as
    select x.*, r.inverse from attr_edges x join relations r using (relation);

create temp table rare_attr_with_inverse as
    select * from attr_with_inverse
    where degree <= $three_hop_max_degree and $max_hops >= 3;

create temp table item_edges as
    select head as item, relation, tail as other from triples
    where head < $n_items and tail < $n_items and head <> tail;
"""


# Per batch of users. Consecutive items of each user's training histories: what led from one
# item to the next before any target, the leak-free material of the history profile. Then the
# item pairs (h, c) → every path between them, computed once per distinct pair.
BATCH_SQL = """
create or replace temp table steps as
    select distinct a.user_idx, a.history_position, a.item_idx as h, b.item_idx as c
    from hist a join hist b
      on a.example_id = b.example_id and b.history_position = a.history_position + 1
    where a.split = 'train';

create or replace temp table pairs as
    select distinct h.item_idx as h, c.candidate_item_idx as c
    from hist h join cand c using (example_id) where h.item_idx <> c.candidate_item_idx
    union select h, c from steps where h <> c;

create or replace temp table pair_paths as
    select p.h, p.c, 1 as hops, e.relation as path_type, [e.relation] as relations,
           null::bigint as via, 0::bigint as via_degree, null::bigint as via_item
    from pairs p join item_edges e on e.item = p.h and e.other = p.c
    union all
    select p.h, p.c, 2 as hops, a.relation as path_type, [a.relation, b.inverse] as relations,
           a.node as via, a.degree as via_degree, null::bigint as via_item
    from pairs p
    join attr_edges a on a.item = p.h
    join attr_with_inverse b on b.item = p.c and b.node = a.node
    where $max_hops >= 2;

-- 3 hops: a direct item–item step before or after a shared rare attribute, e.g.
-- h -co_rated-> m -directed_by-> person <-directed_by- c. Hubs are excluded here: through a
-- genre, one extra step would link nearly every pair. The intermediate item m (`via_item`) is
-- part of the path: two paths through the same attribute differ by it.
insert into pair_paths
    select p.h, p.c, 3, e.relation, [e.relation, a.relation, b.inverse], a.node, a.degree,
           e.other
    from pairs p
    join item_edges e on e.item = p.h and e.other <> p.c
    join rare_attr_with_inverse a on a.item = e.other
    join rare_attr_with_inverse b on b.item = p.c and b.node = a.node
    union all
    select p.h, p.c, 3, a.relation, [a.relation, b.inverse, e.relation], a.node, a.degree,
           b.item
    from pairs p
    join rare_attr_with_inverse a on a.item = p.h
    join rare_attr_with_inverse b on b.node = a.node and b.item <> p.h and b.item <> p.c
    join item_edges e on e.item = b.item and e.other = p.c;
"""


# What a batch yields, as queries (run to a frame, or copied straight to Parquet).
PAIR_FEATURES_QUERY = """
    select c.example_id, c.candidate_item_idx, pp.path_type, count(*)::integer as n_paths,
           any_value(h.user_idx) as user_idx
    from cand c join hist h using (example_id)
    join pair_paths pp on pp.h = h.item_idx and pp.c = c.candidate_item_idx
    group by all order by all
"""


# The last keys make the order total: two paths through the same node by different relations
# (directed_by / written_by the same person), or through the same node and different
# intermediate items (3 hops), would otherwise tie, and which of them survives the cap would
# change from run to run.
KEPT_PATHS_QUERY = """
    select k.* exclude (path_rank), n.name as via_name, m.name as via_item_name from (
        select c.example_id, h.user_idx, h.history_position, h.item_idx as history_item_idx,
               c.candidate_position, c.candidate_item_idx, pp.hops, pp.path_type,
               pp.relations, pp.via, pp.via_degree, pp.via_item,
               row_number() over (
                   partition by c.example_id, h.item_idx, c.candidate_item_idx
                   order by pp.hops, pp.via_degree, pp.path_type, pp.via, pp.via_item,
                            pp.relations
               ) as path_rank
        from cand c join hist h using (example_id)
        join pair_paths pp on pp.h = h.item_idx and pp.c = c.candidate_item_idx
    ) k left join names n on n.entity_id = k.via left join names m on m.entity_id = k.via_item
    where k.path_rank <= {cap}
    order by k.example_id, k.history_position desc, k.candidate_position, k.path_rank
"""


PROFILE_QUERY = """
    select s.user_idx, pp.path_type, count(*)::float as weight
    from steps s join pair_paths pp on pp.h = s.h and pp.c = s.c
    group by all order by all
"""


# Targets vs other candidates, summed so that batches add up (see coverage_stats).
COVERAGE_QUERY = """
    with totals as (
        select example_id, candidate_item_idx, sum(n_paths) as n
        from ({pair_features}) group by example_id, candidate_item_idx
    )
    select c.candidate_item_idx = t.target_item_idx as is_target, count(*) as candidates,
           count(*) filter (where coalesce(x.n, 0) > 0) as with_path,
           coalesce(sum(x.n), 0) as paths
    from cand c join targets t using (example_id)
    left join totals x using (example_id, candidate_item_idx)
    group by all
"""


TABLE_QUERIES = {
    "paths": KEPT_PATHS_QUERY,
    "pair_features": PAIR_FEATURES_QUERY,
    "history_profile": PROFILE_QUERY,
}


def _run_script(con: duckdb.DuckDBPyConnection, script: str, params: dict[str, Any]) -> None:
    """Run `;`-separated statements, binding to each only the `$names` it uses (DuckDB binds
    parameters to a single statement)."""
    for statement in filter(str.strip, script.split(";")):
        used = set(re.findall(r"\$(\w+)", statement))
        con.execute(statement, {k: v for k, v in params.items() if k in used})


def history_rows(examples: pl.DataFrame, sequences: pl.DataFrame, history_len: int) -> pl.DataFrame:
    """(example_id, user_idx, history_position, item_idx): the last H items before each target."""
    return (
        examples.select("example_id", "user_idx", "split", "prefix_len")
        .join(sequences.select("user_idx", "position", "item_idx"), on="user_idx")
        .filter(
            (pl.col("position") < pl.col("prefix_len"))
            & (pl.col("position") >= pl.col("prefix_len") - history_len)
        )
        .select(
            "example_id",
            "user_idx",
            "split",
            pl.col("position").alias("history_position"),
            "item_idx",
        )
    )


def candidate_rows(examples: pl.DataFrame) -> pl.DataFrame:
    return (
        examples.select("example_id", "candidate_item_idxs")
        .with_columns(candidate_position=pl.int_ranges(pl.col("candidate_item_idxs").list.len()))
        .explode("candidate_item_idxs", "candidate_position")
        .rename({"candidate_item_idxs": "candidate_item_idx"})
    )


class _PathEngine:
    """One DuckDB connection holding the graph side; `load` puts a batch of users in it.

    Hand-written SQL rather than a graph library: the paths are short (≤ 3 hops) and typed, so
    set-based joins over each distinct item pair beat per-pair searches by orders of magnitude
    (benchmarks/RESULTS.md).
    """

    def __init__(
        self,
        entities: pl.DataFrame,
        triples: pl.DataFrame,
        relations: pl.DataFrame,
        n_items: int,
        config: PathConfig,
    ) -> None:
        self.config = config
        self.con = duckdb.connect()
        self.con.execute("set threads to 2")
        self.con.register("triples", triples)
        self.con.register("relations", relations)
        self.con.register("names", entities.select("entity_id", "name"))
        self.params = {
            "n_items": n_items,
            "n_users": int((entities["type"] == "user").sum()),
            "max_degree": config.max_attribute_degree,
            "max_hops": config.max_hops,
            "three_hop_max_degree": config.three_hop_max_degree,
        }
        _run_script(self.con, GRAPH_SQL, self.params)

    def load(self, examples: pl.DataFrame, sequences: pl.DataFrame) -> None:
        for name, frame in {
            "hist": history_rows(examples, sequences, self.config.history_len),
            "cand": candidate_rows(examples),
            "targets": examples.select("example_id", "target_item_idx"),
        }.items():
            self.con.register(f"{name}_df", frame)
            self.con.execute(f"create or replace temp table {name} as select * from {name}_df")
            self.con.unregister(f"{name}_df")
        _run_script(self.con, BATCH_SQL, self.params)

    def query(self, table: str) -> str:
        return TABLE_QUERIES[table].format(cap=int(self.config.max_paths_per_pair))

    def counts(self) -> dict[str, int]:
        return {
            "distinct_item_pairs": self.con.sql("select count(*) from pairs").fetchall()[0][0],
            "item_pair_paths": self.con.sql("select count(*) from pair_paths").fetchall()[0][0],
        }

    def coverage_counts(self) -> dict[bool | None, tuple[int, int, int]]:
        """is_target (None: no target to compare with) → (candidates, with a path, paths)."""
        query = COVERAGE_QUERY.format(pair_features=PAIR_FEATURES_QUERY)
        return {t: (int(n), int(w), int(p)) for t, n, w, p in self.con.sql(query).fetchall()}

    def close(self) -> None:
        self.con.close()


def enumerate_paths(
    examples: pl.DataFrame,
    sequences: pl.DataFrame,
    entities: pl.DataFrame,
    triples: pl.DataFrame,
    relations: pl.DataFrame,
    n_items: int,
    config: PathConfig = PathConfig(),
) -> Paths:
    """All paths of every example, with per-type counts and a capped sample of concrete paths,
    in memory (`write_paths` streams the same tables to Parquet, a batch of users at a time).

    `examples` is the candidates table with an `example_id` column; the graph tables are those
    of `lkg_pipeline.core.kg.graph`.
    """
    start = time.perf_counter()
    engine = _PathEngine(entities, triples, relations, n_items, config)
    try:
        engine.load(examples, sequences)
        tables = {name: engine.con.sql(engine.query(name)).pl() for name in TABLE_QUERIES}
        counts = engine.counts()
    finally:
        engine.close()
    return Paths(
        tables["paths"],
        tables["pair_features"],
        tables["history_profile"],
        {
            "examples": examples.height,
            **counts,
            "concrete_paths_kept": tables["paths"].height,
            "seconds": round(time.perf_counter() - start, 2),
            **coverage_stats(examples, tables["pair_features"]),
        },
    )


def write_paths(
    examples: pl.DataFrame,
    sequences: pl.DataFrame,
    entities: pl.DataFrame,
    triples: pl.DataFrame,
    relations: pl.DataFrame,
    n_items: int,
    folder: Path,
    config: PathConfig = PathConfig(),
    users_per_batch: int = 2_500,
) -> dict[str, float | int]:
    """`enumerate_paths`' three tables as `folder/<table>.parquet`, a batch of users at a time,
    so that memory stays bounded by the batch however many users there are.

    Each batch's rows go from DuckDB straight to a Parquet part (never through Python); the
    parts are then concatenated in batch order into one file per table, a row group at a
    time. Within a batch rows are ordered as `enumerate_paths` orders them; with one batch the
    files hold exactly its rows.
    The `PathConfig` is written beside the tables (`PATH_SETTINGS_FILE`): prompts made from
    these paths record it, so paths enumerated again later follow the same settings.
    Returns the statistics of `Paths.stats`, plus `user_batches`; with several batches
    `distinct_item_pairs` and `item_pair_paths` are summed over them (a pair two batches share
    is solved, and counted, in each).
    """
    start = time.perf_counter()
    parts = folder / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    totals = {"distinct_item_pairs": 0, "item_pair_paths": 0}
    coverage: dict[bool | None, list[int]] = {True: [0, 0, 0], False: [0, 0, 0], None: [0, 0, 0]}
    # No examples: one empty batch, so that the tables exist (empty) as enumerate_paths' do.
    batches = user_batches(examples, users_per_batch) or [examples["user_idx"].head(0)]
    engine = _PathEngine(entities, triples, relations, n_items, config)
    try:
        for index, users in enumerate(batches):
            mine = examples.filter(pl.col("user_idx").is_in(users.implode()))
            engine.load(mine, sequences.filter(pl.col("user_idx").is_in(users.implode())))
            for name in TABLE_QUERIES:
                target = quoted_path(parts / f"{name}-{index:06d}.parquet")
                engine.con.execute(f"copy ({engine.query(name)}) to {target} {PARQUET}")
            for key, value in engine.counts().items():
                totals[key] += value
            for is_target, counts in engine.coverage_counts().items():
                coverage[is_target] = [a + b for a, b in zip(coverage[is_target], counts)]
        for name in TABLE_QUERIES:
            concatenate_parquet(
                [parts / f"{name}-{i:06d}.parquet" for i in range(len(batches))],
                folder / f"{name}.parquet",
            )
        (folder / PATH_SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(config)))
        paths_kept = engine.con.sql(
            f"select count(*) from read_parquet({quoted_path(folder / 'paths.parquet')})"
        ).fetchall()[0][0]
    finally:
        engine.close()
        shutil.rmtree(parts, ignore_errors=True)
    return {
        "examples": examples.height,
        "user_batches": len(batches),
        **totals,
        "concrete_paths_kept": paths_kept,
        "seconds": round(time.perf_counter() - start, 2),
        **_coverage_from_counts(coverage),
    }


PARQUET = "(format parquet, compression zstd)"


def quoted_path(path: Path) -> str:
    """A path as a SQL string literal (COPY takes no bound parameters)."""
    return "'" + str(path).replace("'", "''") + "'"


def _coverage_from_counts(coverage: dict[bool | None, list[int]]) -> dict[str, float]:
    """As `coverage_stats`: candidates of an example without a target count only in the
    share over all candidates."""
    (nt, wt, pt), (no, wo, po), (nn, wn, _) = coverage[True], coverage[False], coverage[None]

    def ratio(a: int, b: int) -> float:
        return a / b if b else 0.0

    return {
        "share_candidates_with_path": ratio(wt + wo + wn, nt + no + nn),
        "share_targets_with_path": ratio(wt, nt),
        "share_non_targets_with_path": ratio(wo, no),
        "mean_paths_to_targets": ratio(pt, nt),
        "mean_paths_to_non_targets": ratio(po, no),
    }


def _flag_targets(examples: pl.DataFrame) -> pl.DataFrame:
    return (
        candidate_rows(examples)
        .join(examples.select("example_id", "target_item_idx"), on="example_id")
        .select(
            "example_id",
            "candidate_item_idx",
            is_target=pl.col("candidate_item_idx") == pl.col("target_item_idx"),
        )
    )


def coverage_stats(examples: pl.DataFrame, pair_features: pl.DataFrame) -> dict[str, float]:
    """Targets vs other candidates: share with ≥1 path and mean number of paths.

    Shared genres and years link almost every pair of films, so "has a path" alone says little;
    the mean count, and `signal_by_type`, show whether the graph tells the true item apart.
    """
    totals = pair_features.group_by("example_id", "candidate_item_idx").agg(
        n=pl.col("n_paths").sum()
    )
    flagged = (
        _flag_targets(examples)
        .join(totals, on=["example_id", "candidate_item_idx"], how="left")
        .with_columns(pl.col("n").fill_null(0))
    )
    targets, others = flagged.filter("is_target"), flagged.filter(~pl.col("is_target"))

    def share(frame: pl.DataFrame) -> float:
        return float((frame["n"] > 0).mean()) if frame.height else 0.0

    def mean(frame: pl.DataFrame) -> float:
        return float(frame["n"].mean()) if frame.height else 0.0

    return {
        "share_candidates_with_path": share(flagged),
        "share_targets_with_path": share(targets),
        "share_non_targets_with_path": share(others),
        "mean_paths_to_targets": mean(targets),
        "mean_paths_to_non_targets": mean(others),
    }


def signal_by_type(
    examples: pl.DataFrame, pair_features: pl.DataFrame | Path, users_per_batch: int | None = None
) -> pl.DataFrame:
    """Per path type: share of true items and of other candidates reached by ≥1 such path.

    From a file, a batch of users at a time (`read_users`): the counts add up over batches,
    so the whole pair table (102M rows at 1M Beauty-like users) is never in memory.
    """
    if isinstance(pair_features, Path):
        assert users_per_batch is not None, "reading a file needs users_per_batch"
        columns = ["example_id", "candidate_item_idx", "path_type"]
        batches = [
            (
                examples.filter(pl.col("user_idx").is_in(users.implode())),
                read_users(pair_features, users, columns),
            )
            for users in user_batches(examples, users_per_batch) or [examples["user_idx"]]
        ]
    else:
        batches = [(examples, pair_features)]
    n_targets = n_others = 0
    reached = []
    for mine, features in batches:
        flagged = _flag_targets(mine)
        targets = int(flagged["is_target"].sum())
        n_targets, n_others = n_targets + targets, n_others + flagged.height - targets
        reached.append(
            features.select("example_id", "candidate_item_idx", "path_type")
            .join(flagged, on=["example_id", "candidate_item_idx"])
            .group_by("path_type")
            .agg(targets=pl.col("is_target").sum(), non_targets=(~pl.col("is_target")).sum())
        )
    return (
        pl.concat(reached)
        .group_by("path_type")
        .agg(
            targets=pl.col("targets").sum() / max(n_targets, 1),
            non_targets=pl.col("non_targets").sum() / max(n_others, 1),
        )
        .with_columns(lift=pl.col("targets") / pl.col("non_targets"))
        .sort(["lift", "path_type"], descending=[True, False])  # ties in a fixed order
    )
