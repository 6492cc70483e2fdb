"""Prompt rendering: history, KG relation lines and the lettered candidate pool.

The layout follows the reference (instruction, numbered history, relations, candidates A–T,
then the answer cue) so the LLM's answer is a single letter whose last-position logit is the
candidate's score. Relation lines name the two items they connect and say how, through the
items ("same director"), never through a raw Freebase id.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import polars as pl

from lkg_pipeline.core.kg.freebase import ENTITY_NOUNS
from lkg_pipeline.core.kg.relations import RELATIONS
from lkg_pipeline.core.llm.model import LETTERS
from lkg_pipeline.core.paths.batches import read_users
from lkg_pipeline.core.paths.enumeration import PathConfig
from lkg_pipeline.core.paths.selection import PathSelection

T = TypeVar("T")
VARIANTS = ("llamarec", "kg_rag", "lkg_rag")
# One row per example: what the training script and the ranking stage read.
PROMPT_COLUMNS = {
    "example_id": pl.Int64,
    "user_idx": pl.Int32,
    "split": pl.String,
    "variant": pl.String,
    "prompt": pl.String,
    "candidate_item_idxs": pl.List(pl.Int32),  # letter order: A is the first
    "target_index": pl.Int8,  # the true item's letter position, -1 when not a candidate
    "n_tokens": pl.Int32,
    # The `segments` format only (null for `letters`): one text per candidate, in candidate
    # order, each scored after `prompt` (the shared prefix) without seeing the others.
    "segments": pl.List(pl.String),
    # The retriever's score of each candidate, in candidate order (null where the candidates
    # table has none: train rows under the random policy). Training with `retriever_prior`
    # learns the LLM's scores as a correction on top of these.
    "retriever_scores": pl.List(pl.Float32),
}
ANSWER_CUE = "Answer:"
# letters: the paper's listwise prompt, candidates lettered A–T, scored by the letter logits.
# segments: the history once as a shared prefix, then one short segment per candidate (its
# title and its own relation lines) that attends to the prefix but not to the other
# candidates, scored by logit(" Yes") − logit(" No") at its end (core.llm.segments): no position
# bias by construction, about one letter prompt's tokens.
FORMATS = ("letters", "segments")
# What ends each candidate's segment, before the " Yes"/" No" read there ({noun} and {verb}
# are filled in). The instruction in the prefix already asks the question, so the segments
# end in the cue alone: a repeated question would lengthen every prompt of every LLM stage by
# about a fifth and tells the model nothing the prefix has not (`segment_question` in the
# `prompts` run configuration sets one, e.g. LEGACY_SEGMENT_QUESTION).
SEGMENT_QUESTION = ANSWER_CUE
# What every prompts file made before the question became a setting ended its segments in:
# `PromptSettings.from_dict` reads a missing setting as this, so `recommendations` renders
# prompts exactly as an older adapter's training prompts were.
LEGACY_SEGMENT_QUESTION = "Is it the {noun} they will {verb} next? Answer:"

# A path as a prompt shows it: (history index or number, candidate index, the path's relations,
# the intermediate node's name, the intermediate item's name: three-hop paths only).
ShownPath = tuple[int, int, list[str], str | None, str | None]

# How a path of each type reads between two items. `{via}` is the intermediate node's name.
PATH_PHRASES: dict[str, str] = {
    "co_rated": "often rated by the same people",
    "has_sequel": "the second is its sequel",
    "sequel_of": "it is the sequel of the first",
    "also_bought": "often bought together",
    "also_bought_from": "often bought together",
    "also_viewed": "often viewed together",
    "also_viewed_from": "often viewed together",
    "bought_together": "bought together",
    "bought_together_from": "bought together",
    "has_genre": "both {via}",
    "released_in": "both from {via}",
    "tagged": "both tagged '{via}'",
    "has_brand": "both by {via}",
    "in_category": "both in {via}",
    "has_category_path": "both under {via}",
    "ranked_in": "both ranked in {via}",
    **{relation: f"same {noun}" for relation, noun in ENTITY_NOUNS.items()},
}


@dataclass(frozen=True)
class PromptConfig:
    item_noun: str = "movie"  # "product" for Amazon
    item_verb: str = "watch"  # "buy" for Amazon
    max_history: int = 20  # history items shown at most (the reference's 20)
    max_title_tokens: int = 32  # longer titles are cut to this many tokens (the reference's 32)
    max_prompt_tokens: int = 1024  # oldest history (and its relation lines) goes first
    format: str = "letters"  # FORMATS
    segment_question: str = SEGMENT_QUESTION  # the end of each segment (segments format)

    def __post_init__(self) -> None:
        if not (self.max_history >= 0 and self.max_title_tokens >= 1):
            raise ValueError(
                f"max_history={self.max_history} must be ≥ 0 and "
                f"max_title_tokens={self.max_title_tokens} ≥ 1"
            )
        if self.max_prompt_tokens < 64:
            raise ValueError(
                f"max_prompt_tokens={self.max_prompt_tokens} must be ≥ 64: the instruction "
                "and the candidates alone need more"
            )
        if self.format not in FORMATS:
            raise ValueError(f"unknown prompt format {self.format!r}; choose one of {FORMATS}")
        try:
            question = self.segment_question.format(noun=self.item_noun, verb=self.item_verb)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"segment_question {self.segment_question!r}: only {{noun}} and {{verb}} can "
                f"be filled in ({error!r})"
            ) from None
        if not question.strip():
            raise ValueError("segment_question is empty: a segment needs a cue to answer after")


@dataclass(frozen=True)
class PromptSettings:
    """Everything that decides how an example becomes a prompt. Recorded in each prompts file
    (`SETTINGS_KEY`), so that prompts made again elsewhere (`recommendations`) are made
    exactly as the adapter's training prompts were; `paths` and `selection` are None for a
    variant without KG paths."""

    prompt: PromptConfig
    paths: PathConfig | None = None
    selection: PathSelection | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict) -> PromptSettings:
        prompt = {"segment_question": LEGACY_SEGMENT_QUESTION} | raw["prompt"]
        return cls(
            PromptConfig(**prompt),
            PathConfig(**raw["paths"]) if raw.get("paths") is not None else None,
            PathSelection.from_dict(raw["selection"]) if raw.get("selection") is not None else None,
        )


SETTINGS_KEY = "lkg_pipeline.prompt_settings"  # Parquet key-value metadata of a prompts file
PATHS_KEY = "lkg_pipeline.path_settings"  # ... of the selected paths: {paths, selection}


def path_settings_json(paths: PathConfig, selection: PathSelection) -> str:
    """What the selected paths were made with, as `PATHS_KEY` records it."""
    return json.dumps(
        {"paths": dataclasses.asdict(paths), "selection": dataclasses.asdict(selection)},
        sort_keys=True,
    )


def recorded_settings(metadata: dict[str, str], key: str, where: str) -> dict:
    """The settings a file records under `key`; a clear error for a file made before they
    were recorded (re-materialising that asset records them)."""
    if key not in metadata:
        raise ValueError(
            f"{where} records no {key!r}: it was made before settings were recorded; "
            "re-materialise it (and what depends on it) so that prompts made again follow "
            "the settings the adapter was trained with"
        )
    return json.loads(metadata[key])


def instruction(config: PromptConfig, with_relations: bool) -> str:
    relations = (
        " Relations say how items of the history are connected to candidates."
        if with_relations
        else ""
    )
    return (
        f"Given a user's history of {config.item_noun}s (oldest first), choose the "
        f"{config.item_noun} they will {config.item_verb} next from the candidate pool."
        f"{relations} Answer with the letter of one candidate."
    )


def path_phrase(
    relations: Sequence[str],
    via_name: str | None,
    first: str,
    second: str,
    via_item_name: str | None = None,
) -> str:
    """How a path from `first` to `second` reads: "same director", "both Comedy".

    A path whose two edges differ in role (the director of one wrote the other) says so rather
    than "same director", which would be false. A three-hop path goes through another item
    (`via_item_name`) and reads as its two legs, "through Heat (1995): often rated by the same
    people, then same director": its first relation alone would claim of `first` and `second`
    what holds only between one of them and the intermediate item.
    """
    if len(relations) == 3:
        if via_item_name is None:
            raise ValueError(
                f"the three-hop path {list(relations)} names no intermediate item: it was "
                "enumerated before paths recorded it; re-materialise kg_paths and selected_paths"
            )
        # item → item first (h -co_rated-> m, then m and `second` share an attribute), or
        # the attribute first (`first` and m share it, then m -co_rated-> `second`)
        item_first = RELATIONS[relations[0]].tail_type == "item"
        legs = (relations[:1], relations[1:]) if item_first else (relations[:2], relations[2:])
        one = path_phrase(legs[0], via_name, first, via_item_name)
        two = path_phrase(legs[1], via_name, via_item_name, second)
        return f"through {via_item_name}: {one}, then {two}"
    head = relations[0]
    phrase = PATH_PHRASES.get(head, head.replace("_", " ")).format(via=via_name or "")
    if len(relations) == 2:
        last = RELATIONS[relations[1]].inverse  # the second item's own edge to the shared node
        if last != head and head in ENTITY_NOUNS and last in ENTITY_NOUNS:
            phrase = f"the {ENTITY_NOUNS[head]} of {first} is the {ENTITY_NOUNS[last]} of {second}"
    return phrase


def relation_line(
    history_number: int,
    letter: str,
    relations: Sequence[str],
    via_name: str | None,
    via_item_name: str | None = None,
) -> str:
    """ "(3) and (C): same director": numbers and letters point at the lists above, which keeps
    twenty lines short enough to leave room for the history."""
    phrase = path_phrase(relations, via_name, f"({history_number})", f"({letter})", via_item_name)
    return f"({history_number}) and ({letter}): {phrase}"


def render(
    history_titles: Sequence[str],
    candidate_titles: Sequence[str],
    relations: Sequence[ShownPath],
    config: PromptConfig,
    count_tokens: Callable[[str], int],
    with_relations: bool,
) -> tuple[str, int]:
    """The prompt and its token count, within `max_prompt_tokens`.

    `relations` holds `ShownPath`s, indexing `history_titles` and `candidate_titles`. Over
    budget, the oldest history item goes first, with its relation lines; the candidate pool
    is never cut: a pool that cannot fit is an error.
    """
    assert len(candidate_titles) <= len(LETTERS), f"{len(candidate_titles)} candidates > 20"

    def build(number: dict[int, int]) -> tuple[str, int]:
        lines = [instruction(config, with_relations), "", "User history:"]
        lines += [f"({n}) {history_titles[h]}" for h, n in number.items()]
        if with_relations:
            kept = [r for r in relations if r[0] in number]
            lines += ["", "Relations:"]
            lines += [relation_line(number[h], LETTERS[c], r, v, m) for h, c, r, v, m in kept]
        lines += ["", "Candidate pool:"]
        lines += [f"({LETTERS[c]}) {title}" for c, title in enumerate(candidate_titles)]
        lines += [ANSWER_CUE]
        text = "\n".join(lines)
        return text, count_tokens(text)

    return fit_history(len(history_titles), config, build, "the candidate pool")


def fit_history(
    n_history: int,
    config: PromptConfig,
    build: Callable[[dict[int, int]], tuple[T, int]],
    kept: str,
) -> tuple[T, int]:
    """`build(number)` with the most recent history that fits `max_prompt_tokens`.

    `number` maps each shown history index (oldest first) to its 1-based number; over budget
    the oldest item goes first (with whatever `build` attaches to it), never what `kept` names.
    """
    start = max(0, n_history - config.max_history)
    while True:
        number = {h: i + 1 for i, h in enumerate(range(start, n_history))}
        result, n = build(number)
        if n <= config.max_prompt_tokens:
            return result, n
        if start < n_history:
            start += 1
            continue
        raise ValueError(
            f"prompt needs {n} tokens with no history left; max_prompt_tokens="
            f"{config.max_prompt_tokens} cannot hold {kept}"
        )


def segment_instruction(config: PromptConfig, with_relations: bool) -> str:
    relations = (
        " Relations say how items of the history are connected to the candidate."
        if with_relations
        else ""
    )
    return (
        f"Given a user's history of {config.item_noun}s (oldest first), judge whether a "
        f"candidate {config.item_noun} is the one they will {config.item_verb} next.{relations}"
    )


def segment_text(
    title: str,
    relations: Sequence[tuple[int, list[str], str | None, str | None]],
    config: PromptConfig,
) -> str:
    """One candidate's segment: its title, how it relates to numbered history items, the
    question. `relations` holds (history number, the path's relations, via name,
    intermediate item's name)."""
    lines = ["", f"Candidate: {title}"]
    if relations:
        phrases = [f"({n}) {path_phrase(r, v, f'({n})', 'it', m)}" for n, r, v, m in relations]
        lines.append("Relations: " + "; ".join(phrases))
    lines.append(config.segment_question.format(noun=config.item_noun, verb=config.item_verb))
    return "\n".join(lines)


def render_segments(
    history_titles: Sequence[str],
    candidate_titles: Sequence[str],
    relations: Sequence[ShownPath],
    config: PromptConfig,
    count_tokens: Callable[[str], int],
    with_relations: bool,
) -> tuple[str, list[str], int]:
    """(prefix, one segment per candidate, total tokens) within `max_prompt_tokens`.

    The same budget rule as `render`: the oldest history item goes first, with the relation
    lines that point at it; the candidates are never cut.
    """
    assert len(candidate_titles) <= len(LETTERS), f"{len(candidate_titles)} candidates > 20"

    def build(number: dict[int, int]) -> tuple[tuple[str, list[str]], int]:
        lines = [segment_instruction(config, with_relations), "", "User history:"]
        lines += [f"({n}) {history_titles[h]}" for h, n in number.items()]
        prefix = "\n".join(lines)
        segments = []
        for c, title in enumerate(candidate_titles):
            mine = [(number[h], r, v, m) for h, cc, r, v, m in relations if cc == c and h in number]
            segments.append(segment_text(title, mine if with_relations else [], config))
        return (prefix, segments), count_tokens(prefix) + sum(map(count_tokens, segments))

    (prefix, segments), n = fit_history(len(history_titles), config, build, "the candidates")
    return prefix, segments, n


def shown_paths(selected_paths: pl.DataFrame) -> pl.DataFrame:
    """(example_id, the `ShownPath` fields, selection_rank) of selected paths; paths
    enumerated before the intermediate item was recorded have none (two hops at most)."""
    if "via_item_name" not in selected_paths.columns:
        selected_paths = selected_paths.with_columns(via_item_name=pl.lit(None, pl.String))
    return selected_paths.select(
        "example_id",
        "history_item_idx",
        "candidate_item_idx",
        "relations",
        "via_name",
        "via_item_name",
        "selection_rank",
    )


def build_prompts(
    examples: pl.DataFrame,
    sequences: pl.DataFrame,
    titles: dict[int, str],
    selected_paths: pl.DataFrame | None,
    variant: str,
    config: PromptConfig,
    count_tokens: Callable[[str], int],
) -> pl.DataFrame:
    """One prompt per example for `variant`; columns as the training script expects."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    with_relations = variant != "llamarec"
    # The segments format counts 21 texts per prompt and the same candidate segments recur
    # across users: count each text once.
    count_tokens = functools.lru_cache(maxsize=1 << 18)(count_tokens)
    if with_relations and selected_paths is None:
        raise ValueError(f"variant {variant!r} needs the selected paths")
    per_user = (
        sequences.sort("user_idx", "position").group_by("user_idx").agg(items=pl.col("item_idx"))
    )
    items_of = dict(per_user.iter_rows())
    paths_of: dict[int, list[ShownPath]] = {}
    if with_relations:
        chosen = selected_paths.filter(pl.col("variant") == variant).sort(
            "example_id", "selection_rank"
        )
        for ex, h, c, relations, via, via_item, _ in shown_paths(chosen).iter_rows():
            paths_of.setdefault(ex, []).append((h, c, relations, via, via_item))
    rows = []
    for ex in examples.iter_rows(named=True):
        history = items_of[ex["user_idx"]][: ex["prefix_len"]][-config.max_history :]
        candidates = ex["candidate_item_idxs"]
        position = {item: i for i, item in enumerate(history)}
        slot = {item: c for c, item in enumerate(candidates)}
        relations = [
            (position[h], slot[c], t, v, m)
            for h, c, t, v, m in paths_of.get(ex["example_id"], [])
            if h in position and c in slot
        ]
        shown = ([titles[i] for i in history], [titles[i] for i in candidates], relations)
        if config.format == "segments":
            text, segments, n = render_segments(*shown, config, count_tokens, with_relations)
        else:
            (text, n), segments = render(*shown, config, count_tokens, with_relations), None
        target = ex["target_item_idx"]
        rows.append(
            {
                "example_id": ex["example_id"],
                "user_idx": ex["user_idx"],
                "split": ex["split"],
                "variant": variant,
                "prompt": text,
                "candidate_item_idxs": candidates,
                "target_index": slot.get(target, -1),
                "n_tokens": n,
                "segments": segments,
                "retriever_scores": ex.get("candidate_scores"),
            }
        )
    return pl.DataFrame(rows, schema=PROMPT_COLUMNS)


def prompts_in_batches(
    examples: pl.DataFrame,
    sequences: pl.DataFrame,
    titles: dict[int, str],
    selected_paths: pl.LazyFrame | None,
    variant: str,
    config: PromptConfig,
    count_tokens: Callable[[str], int],
    examples_per_batch: int,
) -> Iterator[pl.DataFrame]:
    """`build_prompts` over consecutive slices of `examples`: the same rows in the same order,
    with memory bounded by a slice. Only the slice's users' selected paths are read (the
    selection is written a batch of users at a time, so the scan skips the rest); token counts
    are cached across slices, as candidate segments recur across users."""
    if examples_per_batch < 1:
        raise ValueError(f"examples_per_batch={examples_per_batch} must be >= 1")
    count_tokens = functools.lru_cache(maxsize=1 << 18)(count_tokens)
    for start in range(0, max(examples.height, 1), examples_per_batch):
        batch = examples.slice(start, examples_per_batch)
        users = batch["user_idx"].unique()
        chosen = None
        if selected_paths is not None and variant != "llamarec":
            chosen = read_users(selected_paths, users).filter(
                pl.col("example_id").is_in(batch["example_id"].implode())
            )
        mine = sequences.filter(pl.col("user_idx").is_in(users.implode()))
        yield build_prompts(batch, mine, titles, chosen, variant, config, count_tokens)


def truncate_titles(titles: dict[int, str], tokenizer, max_tokens: int) -> dict[int, str]:
    """Titles cut to `max_tokens` tokens (with "…"), so one long title cannot eat the budget."""
    out = {}
    for item, title in titles.items():
        ids = tokenizer(title, add_special_tokens=False)["input_ids"]
        out[item] = (
            title if len(ids) <= max_tokens else (tokenizer.decode(ids[:max_tokens]).strip() + "…")
        )
    return out
