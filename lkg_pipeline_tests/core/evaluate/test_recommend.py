"""Recommendations: only unseen items, from the full history, with the prompt's paths as reasons."""

import numpy as np
import polars as pl
import pytest

from lkg_pipeline.core.evaluate.recommend import (
    RecommendConfig,
    explanation_texts,
    full_histories,
    next_item_examples,
    recommendation_table,
)
from lkg_pipeline_tests.core.retrieval.test_retrieval import long_frame, random_model


def toy_sequences(n_users: int = 12, n_items: int = 60, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    seqs = [
        rng.choice(n_items, size=int(rng.integers(5, 30)), replace=False).tolist()
        for _ in range(n_users)
    ]
    return long_frame(seqs)


def test_candidates_come_after_the_whole_history_and_exclude_it() -> None:
    sequences = toy_sequences()
    examples = next_item_examples(random_model(), sequences, RecommendConfig())
    histories = full_histories(sequences)
    assert examples.height == len(histories) == 12
    for row, history in zip(examples.iter_rows(named=True), histories, strict=True):
        assert row["prefix_len"] == len(history)  # train + val + test
        assert len(set(row["candidate_item_idxs"])) == 20
        assert not set(row["candidate_item_idxs"]) & set(history)  # val and test items too
        assert row["target_item_idx"] is None and row["split"] == "next"
    few = next_item_examples(random_model(), sequences, RecommendConfig(max_users=3))
    assert few["user_idx"].to_list() == [0, 1, 2]


def ranked_like_the_retriever(examples: pl.DataFrame) -> pl.DataFrame:
    return examples.select(
        "example_id",
        "user_idx",
        ranked_item_idxs=pl.col("candidate_item_idxs").list.reverse(),
        ranked_scores=pl.int_ranges(20).list.eval(-pl.element().cast(pl.Float32)),
    )


def test_top_n_with_titles_and_explanations_never_a_consumed_item() -> None:
    sequences = toy_sequences()
    examples = next_item_examples(random_model(), sequences)
    titles = {i: f"Film {i}" for i in range(60)}
    first = examples.row(0, named=True)
    history = full_histories(sequences)[0]
    chosen = first["candidate_item_idxs"][-1]  # the LLM's first choice below
    selected = pl.DataFrame(
        {
            "example_id": [0, 0],
            "history_item_idx": [history[-1], history[-2]],
            "candidate_item_idx": [chosen, chosen],
            "relations": [["directed_by", "directed"], ["has_genre", "genre_of"]],
            "via_name": ["director of A and 2 more", "Comedy"],
            "selection_rank": [2, 1],
        }
    )
    reasons = explanation_texts(selected, titles, "watch")
    table = recommendation_table(
        examples,
        ranked_like_the_retriever(examples),
        reasons,
        titles,
        full_histories(sequences),
        "lkg_rag",
        top_n=10,
        ranker="retriever",
    )
    assert table.height == 12 * 10 and table.group_by("user_idx").len()["len"].unique().item() == 10
    top = table.row(0, named=True)
    assert (top["user_idx"], top["rank"], top["item_idx"]) == (0, 1, chosen)
    assert top["title"] == f"Film {chosen}" and top["retriever_rank"] == 20
    assert top["explanations"] == [  # most salient (selection_rank 1) first
        f"because you watched Film {history[-2]}: both Comedy",
        f"because you watched Film {history[-1]}: same director",
    ]
    assert top["explanation"] == top["explanations"][0]
    assert table.filter(pl.col("user_idx") > 0)["explanation"].is_null().all()

    consumed = full_histories(sequences)
    consumed[0] = [*consumed[0], chosen]  # pretend user 0 had already watched it
    with pytest.raises(ValueError, match="1 recommendations are items the user already consumed"):
        recommendation_table(
            examples,
            ranked_like_the_retriever(examples),
            None,
            titles,
            consumed,
            "lkg_rag",
            10,
            "x",
        )


def test_prompts_made_again_follow_the_recorded_settings_not_the_defaults(tmp_path) -> None:
    """Serving prompts (`prompts_as_trained`) equal the training prompts of the same examples
    made the pipeline's way (write_paths → select_paths → build_prompts) with non-default
    settings, once those settings have gone through the file's JSON record."""
    import dataclasses
    import json
    import os
    from pathlib import Path
    from types import SimpleNamespace

    from benchmarks.paths.bench import QUICK_ITEMS, SHAPES, synthetic_inputs
    from lkg_pipeline.core.evaluate.recommend import prompts_as_trained
    from lkg_pipeline.core.llm.model import smollm2_tokenizer
    from lkg_pipeline.core.llm.prompts import (
        PromptConfig,
        PromptSettings,
        build_prompts,
        path_settings_json,
        truncate_titles,
    )
    from lkg_pipeline.core.paths.enumeration import PATH_SETTINGS_FILE, PathConfig, write_paths
    from lkg_pipeline.core.paths.selection import PathSelection, select_paths

    repo = Path(__file__).resolve().parents[3]
    tokenizer = smollm2_tokenizer(
        Path(os.environ.get("LKG_TEST_CACHE", repo / "data_lake" / "cache"))
    )
    spec = dataclasses.replace(SHAPES["ml-100k-like"], n_items=QUICK_ITEMS["ml-100k-like"])
    inputs, _ = synthetic_inputs(spec, 12)
    examples = inputs.examples.filter(pl.col("split") == "test")
    titles = {
        i: f"The Film Number {i}: A Rather Long Subtitle (199{i % 10})"
        for i in range(inputs.n_items)
    }
    graph = (inputs.entities, inputs.triples, inputs.relations, inputs.n_items)
    path_config = PathConfig(max_hops=1, max_paths_per_pair=1)
    selection = PathSelection(per_history_item=2, max_paths=5)
    prompt_config = PromptConfig(
        max_history=7, max_title_tokens=4, max_prompt_tokens=900, format="segments"
    )

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # the pipeline's way: kg_paths writes the tables and its settings, preference_model selects
    write_paths(examples, inputs.sequences, *graph, tmp_path, path_config)
    recorded_paths = json.loads(
        path_settings_json(
            PathConfig(**json.loads((tmp_path / PATH_SETTINGS_FILE).read_text())), selection
        )
    )
    selected = select_paths(pl.read_parquet(tmp_path / "paths.parquet"), None, selection)
    trained = build_prompts(
        examples,
        inputs.sequences,
        truncate_titles(titles, tokenizer, 4),
        selected.with_columns(variant=pl.lit("kg_rag")),
        "kg_rag",
        prompt_config,
        count,
    )
    settings = PromptSettings(
        prompt_config,
        PathConfig(**recorded_paths["paths"]),
        PathSelection(**recorded_paths["selection"]),
    )
    settings = PromptSettings.from_dict(json.loads(settings.to_json()))  # as the file records it
    assert settings == PromptSettings(prompt_config, path_config, selection)

    kg = SimpleNamespace(
        entities=inputs.entities, triples=inputs.triples, relations=inputs.relations
    )
    served, served_paths = prompts_as_trained(
        examples, inputs.sequences, titles, kg, None, "kg_rag", settings, tokenizer
    )
    assert served_paths is not None and served_paths["hops"].max() == 1
    assert served.select("example_id", "prompt", "segments").equals(
        trained.select("example_id", "prompt", "segments")
    )
    assert (served["n_tokens"] <= 900).all()
    # what recommendations did before: default settings render other prompts
    defaults, _ = prompts_as_trained(
        examples,
        inputs.sequences,
        titles,
        kg,
        None,
        "kg_rag",
        PromptSettings(PromptConfig(format="segments"), PathConfig(), PathSelection()),
        tokenizer,
    )
    assert not defaults["segments"].equals(trained["segments"])
