import json

import polars as pl
import pytest

from lkg_pipeline.core.llm.prompts import (
    PromptConfig,
    PromptSettings,
    build_prompts,
    render,
)
from lkg_pipeline.core.paths.selection import PathSelection

TITLES = {0: "Heat (1995)", 1: "Ronin (1998)", 2: "Toy Story (1995)", 3: "Casino (1995)"}


def words(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def frames() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    sequences = pl.DataFrame(
        {"user_idx": [0, 0, 0, 0], "item_idx": [0, 2, 1, 3], "position": [0, 1, 2, 3]},
        schema={"user_idx": pl.Int32, "item_idx": pl.Int32, "position": pl.Int32},
    )
    examples = pl.DataFrame(
        {
            "example_id": [5],
            "user_idx": [0],
            "split": ["test"],
            "prefix_len": [2],
            "target_item_idx": [1],
            "candidate_item_idxs": [[3, 1]],
            "candidate_scores": [[2.5, -1.0]],  # the retriever's, in candidate order
        },
        schema_overrides={
            "user_idx": pl.Int32,
            "prefix_len": pl.Int32,
            "target_item_idx": pl.Int32,
            "candidate_item_idxs": pl.List(pl.Int32),
            "candidate_scores": pl.List(pl.Float32),
            "example_id": pl.Int64,
        },
    )
    selected = pl.DataFrame(
        {
            "example_id": [5, 5, 5],
            "variant": ["lkg_rag", "lkg_rag", "kg_rag"],
            "history_item_idx": [0, 2, 0],
            "candidate_item_idx": [1, 3, 3],
            "relations": [["directed_by", "directed"], ["has_genre", "genre_of"], ["co_rated"]],
            "via_name": ["director of Heat (1995)", "Comedy", None],
            "selection_rank": [1, 2, 1],
        },
        schema_overrides={"example_id": pl.Int64},
    )
    return examples, sequences, selected


GOLDEN_LKG = """\
Given a user's history of movies (oldest first), choose the movie they will watch next from \
the candidate pool. Relations say how items of the history are connected to candidates. Answer \
with the letter of one candidate.

User history:
(1) Heat (1995)
(2) Toy Story (1995)

Relations:
(1) and (B): same director
(2) and (A): both Comedy

Candidate pool:
(A) Casino (1995)
(B) Ronin (1998)
Answer:"""

GOLDEN_LLAMAREC = """\
Given a user's history of movies (oldest first), choose the movie they will watch next from \
the candidate pool. Answer with the letter of one candidate.

User history:
(1) Heat (1995)
(2) Toy Story (1995)

Candidate pool:
(A) Casino (1995)
(B) Ronin (1998)
Answer:"""


def test_golden_prompts_for_each_variant() -> None:
    examples, sequences, selected = frames()
    lkg = build_prompts(examples, sequences, TITLES, selected, "lkg_rag", PromptConfig(), words)
    assert lkg["prompt"][0] == GOLDEN_LKG
    assert lkg.row(0, named=True) | {"prompt": None} == {
        "example_id": 5,
        "user_idx": 0,
        "split": "test",
        "variant": "lkg_rag",
        "prompt": None,
        "candidate_item_idxs": [3, 1],
        "target_index": 1,
        "n_tokens": words(GOLDEN_LKG),
        "segments": None,  # the letters format
        "retriever_scores": [2.5, -1.0],  # carried over for retriever_prior
    }
    plain = build_prompts(examples, sequences, TITLES, None, "llamarec", PromptConfig(), words)
    assert plain["prompt"][0] == GOLDEN_LLAMAREC
    kg = build_prompts(examples, sequences, TITLES, selected, "kg_rag", PromptConfig(), words)
    assert "(1) and (A): often rated by the same people" in kg["prompt"][0]


def test_mixed_role_paths_say_both_roles() -> None:
    from lkg_pipeline.core.llm.prompts import relation_line

    assert relation_line(10, "E", ["directed_by", "wrote"], "writer of X") == (
        "(10) and (E): the director of (10) is the writer of (E)"
    )
    assert relation_line(3, "C", ["starring", "acted_in"], "actor of X") == (
        "(3) and (C): same actor"
    )


def test_three_hop_paths_read_as_their_two_legs() -> None:
    from lkg_pipeline.core.llm.prompts import path_phrase, relation_line

    item_first = ["co_rated", "directed_by", "directed"]  # (3) ~ Heat, Heat's director made (C)
    assert relation_line(3, "C", item_first, "Michael Mann", "Heat (1995)") == (
        "(3) and (C): through Heat (1995): often rated by the same people, then same director"
    )
    # (3)'s director wrote M; (C) follows M
    attribute_first = ["directed_by", "wrote", "has_sequel"]
    assert relation_line(3, "C", attribute_first, "X", "M") == (
        "(3) and (C): through M: the director of (3) is the writer of M, then the second is its "
        "sequel"
    )
    with pytest.raises(ValueError, match="re-materialise kg_paths"):  # paths from before
        path_phrase(item_first, "Michael Mann", "(3)", "(C)")


def test_budget_drops_the_oldest_history_first_never_candidates() -> None:
    examples, sequences, selected = frames()
    full = words(GOLDEN_LKG)
    config = PromptConfig(max_prompt_tokens=full - 1)
    out = build_prompts(examples, sequences, TITLES, selected, "lkg_rag", config, words)
    text = out["prompt"][0]
    assert "Heat" not in text and "(1) Toy Story (1995)" in text
    assert "(1) and (A): both Comedy" in text and "same director" not in text
    assert text.endswith("(A) Casino (1995)\n(B) Ronin (1998)\nAnswer:")
    with pytest.raises(ValueError, match="cannot hold the candidate pool"):
        render([], ["x " * 80], [], PromptConfig(max_prompt_tokens=64), words, False)


def test_unknown_variant_and_missing_paths() -> None:
    examples, sequences, _ = frames()
    with pytest.raises(ValueError, match="choose one of llamarec, kg_rag, lkg_rag"):
        build_prompts(examples, sequences, TITLES, None, "rag", PromptConfig(), words)
    with pytest.raises(ValueError, match="needs the selected paths"):
        build_prompts(examples, sequences, TITLES, None, "kg_rag", PromptConfig(), words)


def test_path_selection_settings_round_trip_and_normalise() -> None:
    excluded = PathSelection(exclude_path_types=["from_country", "co_rated", "co_rated"])
    assert excluded.exclude_path_types == ("co_rated", "from_country")  # order, repeats: one
    assert excluded == PathSelection(exclude_path_types=("from_country", "co_rated"))
    settings = PromptSettings(PromptConfig(), selection=excluded)
    assert PromptSettings.from_dict(json.loads(settings.to_json())) == settings
    # a file recorded before the setting existed: nothing was excluded
    old = json.loads(PromptSettings(PromptConfig(), selection=PathSelection()).to_json())
    del old["selection"]["exclude_path_types"]
    assert PromptSettings.from_dict(old).selection == PathSelection()
    # ... and one recorded before ties were hashed was made in candidate order: prompts made
    # again for its adapter (recommendations) must be made that way too
    del old["selection"]["tie_break"]
    assert PromptSettings.from_dict(old).selection == PathSelection(tie_break="candidate_order")
    assert PathSelection().tie_break == "hashed"
    with pytest.raises(TypeError, match="a list of path types"):
        PathSelection(exclude_path_types="co_rated")
    with pytest.raises(ValueError, match="tie_break='random'"):
        PathSelection(tie_break="random")  # type: ignore[arg-type]
