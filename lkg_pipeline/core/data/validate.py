"""Invariants of prepared data, as plain functions the Dagster checks wrap.

Each returns an `Outcome` whose metadata shows the offending rows, so that a failed check in
the UI says what is wrong and where, not just that something is. An empty table fails every
check: "0 of 0 users break the split" is true of no data at all, and a check that passes on it
would let an empty run replace good tables unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl


@dataclass(frozen=True)
class Outcome:
    passed: bool
    description: str
    metadata: dict[str, int | float | str] = field(default_factory=dict)


def _examples(frame: pl.DataFrame, n: int = 5) -> str:
    return str(frame.head(n).to_dicts())


def _empty(what: str, *frames: pl.DataFrame) -> Outcome | None:
    """A failed outcome when any of `frames` has no row (nothing to check is not a pass)."""
    if any(f.is_empty() for f in frames):
        return Outcome(False, f"{what}: empty table, nothing to check", {"rows": 0})
    return None


def unique_ids(frame: pl.DataFrame, *columns: str) -> Outcome:
    """Each of `columns` (an index and the native id it maps) identifies one row."""
    if empty := _empty("unique ids", frame):
        return empty
    dupes = {c: frame.height - frame[c].n_unique() for c in columns}
    bad = {c: n for c, n in dupes.items() if n}
    return Outcome(
        not bad,
        f"duplicated ids: {bad}"
        if bad
        else f"{', '.join(columns)} unique over {frame.height} rows",
        {f"duplicates_{c}": n for c, n in dupes.items()},
    )


def dense_ids(frame: pl.DataFrame, column: str) -> Outcome:
    """`column` takes exactly the values 0..n-1: embedding tables index by it."""
    if empty := _empty(f"dense {column}", frame):
        return empty
    values = frame[column].unique()
    n = len(values)
    ok = int(values.min()) == 0 and int(values.max()) == n - 1
    return Outcome(
        ok, f"{column}: {n} distinct values in [{values.min()}, {values.max()}]", {"distinct": n}
    )


def non_empty_titles(items: pl.DataFrame) -> Outcome:
    if empty := _empty("titles", items):
        return empty
    bad = items.filter(pl.col("title").is_null() | (pl.col("title").str.strip_chars() == ""))
    return Outcome(
        bad.is_empty(),
        f"{bad.height} items without a title",
        {"items_without_title": bad.height, "examples": _examples(bad)},
    )


def min_sequence_length(sequences: pl.DataFrame, minimum: int = 3) -> Outcome:
    if empty := _empty("sequence lengths", sequences):
        return empty
    lengths = sequences.group_by("user_idx").len()
    short = lengths.filter(pl.col("len") < minimum)
    return Outcome(
        short.is_empty(),
        f"{short.height} users with fewer than {minimum} interactions",
        {"short_users": short.height, "min_length": int(lengths["len"].min() or 0)},
    )


def leave_one_out_consistent(sequences: pl.DataFrame) -> Outcome:
    """Every user: exactly one val and one test row, at the last two positions, in time order."""
    if empty := _empty("leave-one-out split", sequences):
        return empty
    per_user = sequences.group_by("user_idx").agg(
        n=pl.len(),
        val=(pl.col("split") == "val").sum(),
        test=(pl.col("split") == "test").sum(),
        val_pos=pl.col("position").filter(pl.col("split") == "val").first(),
        test_pos=pl.col("position").filter(pl.col("split") == "test").first(),
        max_train_ts=pl.col("timestamp").filter(pl.col("split") == "train").max(),
        val_ts=pl.col("timestamp").filter(pl.col("split") == "val").first(),
        test_ts=pl.col("timestamp").filter(pl.col("split") == "test").first(),
        positions_ok=(pl.col("position").sort() == pl.int_range(pl.len())).all(),
    )
    bad = per_user.filter(
        (pl.col("val") != 1)
        | (pl.col("test") != 1)
        | (pl.col("test_pos") != pl.col("n") - 1)
        | (pl.col("val_pos") != pl.col("n") - 2)
        | (pl.col("max_train_ts") > pl.col("val_ts"))
        | (pl.col("val_ts") > pl.col("test_ts"))
        | ~pl.col("positions_ok")
    )
    users = per_user.height
    counts = {s: int((sequences["split"] == s).sum()) for s in ("train", "val", "test")}
    ok = bad.is_empty() and counts["val"] == users and counts["test"] == users
    return Outcome(
        ok,
        f"{bad.height} of {users} users break the leave-one-out split",
        {
            "inconsistent_users": bad.height,
            **{f"{s}_rows": n for s, n in counts.items()},
            "examples": _examples(bad),
        },
    )


# --- knowledge graph ------------------------------------------------------------------------


def no_dangling_ids(entities: pl.DataFrame, triples: pl.DataFrame) -> Outcome:
    if empty := _empty("entities and triples", entities, triples):
        return empty
    ids = entities["entity_id"].implode()
    dangling = triples.filter(~pl.col("head").is_in(ids) | ~pl.col("tail").is_in(ids))
    return Outcome(
        dangling.is_empty(),
        f"{dangling.height} triples point at unknown entities",
        {"dangling_triples": dangling.height, "examples": _examples(dangling)},
    )


def inverses_complete(triples: pl.DataFrame, inverse_of: dict[str, str]) -> Outcome:
    """Every (h, r, t) has (t, inverse(r), h), so any path can be walked both ways."""
    if empty := _empty("triples", triples):
        return empty
    unknown = set(triples["relation"].unique()) - set(inverse_of)
    expected = triples.select(
        head=pl.col("tail"), relation=pl.col("relation").replace(inverse_of), tail=pl.col("head")
    )
    missing = expected.join(
        triples.select("head", "relation", "tail"), on=["head", "relation", "tail"], how="anti"
    )
    ok = missing.is_empty() and not unknown
    return Outcome(
        ok,
        f"{missing.height} triples lack their inverse; unknown relations: "
        f"{sorted(unknown) or 'none'}",
        {"missing_inverses": missing.height, "examples": _examples(missing)},
    )


def no_held_out_leakage(triples: pl.DataFrame, sequences: pl.DataFrame, n_items: int) -> Outcome:
    """No val/test interaction in `rated` edges, and co_rated weights count training pairs only.

    The co-rating counts are recomputed here from the training split, independently of the
    builder's SQL: a weight above the training count can only come from held-out interactions.
    """
    if empty := _empty("triples and sequences", triples, sequences):
        return empty
    train = sequences.filter(pl.col("split") == "train").select("user_idx", "item_idx")
    held = sequences.filter(pl.col("split") != "train").select("user_idx", "item_idx")
    rated = triples.filter(pl.col("relation") == "rated").select(
        user_idx=(pl.col("head") - n_items).cast(pl.Int32), item_idx=pl.col("tail").cast(pl.Int32)
    )
    leaked = rated.join(held, on=["user_idx", "item_idx"], how="semi")
    not_train = rated.join(train, on=["user_idx", "item_idx"], how="anti")
    co = triples.filter(pl.col("relation") == "co_rated").select(
        a=pl.col("head").cast(pl.Int32), b=pl.col("tail").cast(pl.Int32), weight="weight"
    )
    counted = (
        co.join(train.rename({"item_idx": "a"}), on="a")
        .join(train.rename({"item_idx": "b"}), on=["b", "user_idx"], how="semi")
        .group_by("a", "b")
        .agg(train_count=pl.len())
    )
    co = co.join(counted, on=["a", "b"], how="left").with_columns(
        pl.col("train_count").fill_null(0)
    )
    inflated = co.filter(pl.col("weight") > pl.col("train_count"))
    bad = leaked.height + not_train.height + inflated.height
    return Outcome(
        bad == 0,
        f"{leaked.height} held-out interactions in rated edges, {not_train.height} rated edges "
        f"not in train, {inflated.height} co_rated weights above their training count",
        {
            "held_out_rated_edges": leaked.height,
            "non_train_rated_edges": not_train.height,
            "inflated_co_rated": inflated.height,
            "examples": _examples(pl.concat([leaked, not_train], how="vertical_relaxed"))
            + _examples(inflated),
        },
    )


def item_metadata_coverage(
    entities: pl.DataFrame, triples: pl.DataFrame, behaviour_relations: set[str]
) -> Outcome:
    """Share of catalogue items with at least one non-behaviour edge (warn when not all)."""
    items = entities.filter(pl.col("type") == "item")
    if empty := _empty("items", items):
        return empty
    covered = (
        triples.filter(~pl.col("relation").is_in(list(behaviour_relations)))
        .filter(pl.col("head").is_in(items["entity_id"].implode()))["head"]
        .n_unique()
    )
    share = covered / items.height
    uncovered = items.filter(
        ~pl.col("entity_id").is_in(
            triples.filter(~pl.col("relation").is_in(list(behaviour_relations)))["head"].implode()
        )
    )
    return Outcome(
        share == 1.0,
        f"{covered} of {items.height} items ({share:.1%}) have a non-behaviour edge",
        {
            "items_covered": covered,
            "share_covered": share,
            "examples": _examples(uncovered.select("entity_id", "name")),
        },
    )


# --- candidates -----------------------------------------------------------------------------


def candidates_well_formed(table: pl.DataFrame, sequences: pl.DataFrame, k: int = 20) -> Outcome:
    """Each example: k distinct candidates, none from its own input history, and the target
    present exactly when `in_candidates` says so (always, for training examples)."""
    if empty := _empty("candidates", table):
        return empty
    rows = table.with_row_index("row")
    sizes = rows.select(
        "row",
        n=pl.col("candidate_item_idxs").list.len(),
        distinct=pl.col("candidate_item_idxs").list.n_unique(),
        has_target=pl.col("candidate_item_idxs").list.contains(pl.col("target_item_idx")),
        in_candidates="in_candidates",
    )
    bad_size = sizes.filter((pl.col("n") != k) | (pl.col("distinct") != k))
    bad_target = sizes.filter(pl.col("has_target") != pl.col("in_candidates"))
    positions = sequences.select("user_idx", "item_idx", "position")
    from_history = (
        rows.select("row", "user_idx", "prefix_len", item_idx="candidate_item_idxs")
        .explode("item_idx")
        .join(positions, on=["user_idx", "item_idx"])
        .filter(pl.col("position") < pl.col("prefix_len"))
    )
    bad = bad_size.height + bad_target.height + from_history["row"].n_unique()
    return Outcome(
        bad == 0,
        f"{bad_size.height} lists not {k} distinct items, {bad_target.height} with a wrong "
        f"in_candidates flag, {from_history['row'].n_unique()} holding a history item",
        {
            "bad_size": bad_size.height,
            "bad_target_flag": bad_target.height,
            "history_in_candidates": from_history["row"].n_unique(),
            "examples": _examples(from_history),
        },
    )
