"""The planted-signal benchmark's pieces, and a miniature of its experiment on the tiny model.

The miniature runs the same chain as `make sanity` through the core (a studio planted as a
Freebase-like fact → `build_kg` → `enumerate_paths` → `select_paths` → `build_prompts` →
`training_function` → `rank_prompts`) on 40 synthetic users: the cue must reach every test
prompt, and training must lift the planted item from where the untrained model puts it.
"""

import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from benchmarks.quality.planted import (
    CUE,
    DESIGN,
    PATH_TYPE,
    RELATION,
    derangement,
    plant_links,
    set_aside_other_design,
    studio_facts,
    swap_relations,
)
from lkg_pipeline.core.kg.graph import KGConfig, build_kg
from lkg_pipeline.core.llm.model import LETTERS
from lkg_pipeline.core.llm.prompts import PromptConfig, build_prompts
from lkg_pipeline.core.llm.rank.scoring import load_ranker, rank_prompts
from lkg_pipeline.core.llm.train.config import RunPaths, TrainConfig
from lkg_pipeline.core.llm.train.loop import training_function
from lkg_pipeline.core.paths.enumeration import enumerate_paths
from lkg_pipeline.core.paths.selection import select_paths
from lkg_pipeline_tests.core.kg.test_kg import items_frame, sequences_frame
from lkg_pipeline_tests.core.paths.test_paths import examples_frame

N_ITEMS = 400


def synthetic_lake(n_users: int, seed: int = 0, n_items: int = N_ITEMS) -> dict[str, pl.DataFrame]:
    """Random 8-item histories; per user a train, val and test example whose 20 candidates
    are the true item and 19 unseen items, shuffled."""
    rng = random.Random(seed)
    per_user = {u: rng.sample(range(n_items), 8) for u in range(n_users)}
    sequences = sequences_frame(per_user)
    counts = sequences.filter(pl.col("split") == "train").group_by("item_idx").len()
    count_of = dict(counts.iter_rows())
    items = items_frame(
        [(i, 10 + i, f"film {i}", None, [], count_of.get(i, 0)) for i in range(n_items)]
    )
    rows = []
    for u, seq in per_user.items():
        for split, prefix in (("train", 5), ("val", 6), ("test", 7)):
            others = rng.sample([i for i in range(n_items) if i not in seq], len(LETTERS) - 1)
            pool = [seq[prefix], *others]
            rng.shuffle(pool)
            rows.append((3 * u + ("train", "val", "test").index(split), u, split, prefix,
                         seq[prefix], pool))  # fmt: skip
    candidates = examples_frame(rows)
    links = pl.DataFrame(
        {"item_id": [10 + i for i in range(0, n_items, 2)]},
        schema={"item_id": pl.Int64},
    ).with_columns(entity_id=pl.format("m.film_{}", "item_id"))
    return {"candidates": candidates, "sequences": sequences, "items": items, "links": links}


def test_doses_nest_and_dose_zero_plants_only_uniform_decoys() -> None:
    lake = synthetic_lake(60)
    args = (lake["candidates"], lake["sequences"], lake["items"])
    full, some, none = (plant_links(*args, dose, decoy_rate=0.5) for dose in (1.0, 0.3, 0.0))
    drawn = pl.col("kind").is_in(["planted", "blocked"])
    planted = {d: set(f.filter(drawn)["example_id"]) for d, f in
               (("full", full), ("some", some), ("none", none))}  # fmt: skip
    assert planted["full"] == set(lake["candidates"]["example_id"])
    assert planted["none"] == set() and 0 < len(planted["some"]) < len(planted["full"])
    assert planted["some"] < planted["full"]
    # the decoys are the same draws at every dose
    assert full.filter(pl.col("kind") == "decoy").equals(none.filter(pl.col("kind") == "decoy"))
    joined = full.join(lake["candidates"], on="example_id")
    # planted links end at the true item, decoys at one of the candidates, and every link
    # starts from the example's shown history
    assert (joined.filter(drawn)["item_idx"] ==
            joined.filter(drawn)["target_item_idx"]).all()  # fmt: skip
    decoys = joined.filter(pl.col("kind") == "decoy")
    assert all(i in pool for i, pool in decoys.select("item_idx", "candidate_item_idxs").rows())
    history = dict(
        lake["sequences"].sort("position").group_by("user_idx").agg("item_idx").iter_rows()
    )
    for h, user, prefix in joined.select("history_item_idx", "user_idx", "prefix_len").rows():
        assert h in history[user][:prefix]


def test_a_planted_link_never_shows_on_a_wrong_candidate_of_a_train_or_test_prompt() -> None:
    # few items: most links would also show elsewhere, so both kinds of draw happen
    lake = synthetic_lake(60, n_items=60)
    candidates = lake["candidates"]
    links = plant_links(candidates, lake["sequences"], lake["items"], 1.0, decoy_rate=0.0)
    kinds = links.group_by("kind").len()
    assert set(kinds["kind"]) == {"planted", "blocked"}, kinds
    history = dict(
        lake["sequences"].sort("position").group_by("user_idx").agg("item_idx").iter_rows()
    )
    prompts = [
        (e, split, set(history[u][:prefix]), set(pool) - {target})
        for e, u, split, prefix, target, pool in candidates.select(
            "example_id", "user_idx", "split", "prefix_len", "target_item_idx",
            "candidate_item_idxs",
        ).rows()
    ]  # fmt: skip

    def misleads(a: int, b: int, example: int) -> bool:
        return any(
            e != example
            and split != "val"
            and ((a in shown and b in wrong) or (b in shown and a in wrong))
            for e, split, shown, wrong in prompts
        )

    own = {e: shown for e, _, shown, _ in prompts}
    for example, h, kind, t in links.select(
        "example_id", "history_item_idx", "kind", "item_idx"
    ).rows():
        if kind == "planted":
            assert not misleads(h, t, example)
        else:  # blocked: every shown history item's link would mislead somewhere
            assert all(misleads(other, t, example) for other in own[example])
    # only planted links become studios
    _, triples = studio_facts(links, lake["items"], lake["links"])
    assert triples["tail"].n_unique() == kinds.filter(pl.col("kind") == "planted")["len"].item()


def test_pieces_of_another_design_are_set_aside_whole(tmp_path: Path) -> None:
    root = tmp_path / "planted"
    (root / "results").mkdir(parents=True)
    (root / "results" / "p1_lkg_rag.parquet").write_text("made by the first design")
    set_aside_other_design(root)  # no design.json: made before designs were recorded
    assert not (root / "results").exists()
    assert (tmp_path / "planted.superseded" / "results" / "p1_lkg_rag.parquet").exists()
    assert json.loads((root / "design.json").read_text()) == DESIGN
    (root / "results").mkdir()
    (root / "results" / "p1_lkg_rag.parquet").write_text("this design")
    set_aside_other_design(root)  # the same design: kept
    assert (root / "results" / "p1_lkg_rag.parquet").read_text() == "this design"


def test_studio_facts_give_each_linked_pair_its_own_studio() -> None:
    lake = synthetic_lake(10)
    links = pl.DataFrame(
        {
            "example_id": [0, 1, 2],
            "split": ["train"] * 3,
            "history_item_idx": [1, 1, 4],
            "kind": ["planted", "planted", "decoy"],
            "item_idx": [2, 2, 3],  # the first pair twice: one studio
        },
        schema_overrides={"history_item_idx": pl.Int32, "item_idx": pl.Int32},
    )
    new_links, triples = studio_facts(links, lake["items"], lake["links"])
    # odd items had no Freebase id: each gets one
    assert set(new_links["item_id"]) == {10 + i for i in range(1, N_ITEMS, 2)}
    assert triples["relation"].unique().to_list() == [RELATION]
    assert triples.group_by("tail").len()["len"].to_list() == [2, 2]
    kg = build_kg(
        lake["items"],
        lake["sequences"],
        KGConfig(co_rated_top_n=0),
        entity_links=pl.concat([lake["links"], new_links]),
        entity_triples=triples,
    )
    studios = kg.triples.filter(pl.col("relation") == PATH_TYPE)
    assert studios.height == 4  # item → studio for both items of both studios
    names = kg.entities.filter(pl.col("type") == "studio")["name"].to_list()
    assert sorted(names) == ["studio of film 1 and 1 more", "studio of film 3 and 1 more"]


def test_swap_moves_every_relation_line_to_another_candidate() -> None:
    segments = [
        "\nCandidate: a\nRelations: (1) same studio\nAnswer:",
        "\nCandidate: b\nAnswer:",
        "\nCandidate: c\nRelations: (2) same actor\nAnswer:",
        "\nCandidate: d\nAnswer:",
    ]
    swapped = swap_relations(segments, np.random.default_rng(0))
    assert [s.split("\n")[1] for s in swapped] == ["Candidate: a", "Candidate: b",
                                                    "Candidate: c", "Candidate: d"]  # fmt: skip
    assert all(s.endswith("\nAnswer:") for s in swapped)
    assert "same studio" not in swapped[0] and "same actor" not in swapped[2]
    assert sorted(line for s in swapped for line in s.split("\n") if line.startswith("Rel")) == [
        "Relations: (1) same studio",
        "Relations: (2) same actor",
    ]
    for n in (2, 5, 20):
        order = derangement(n, np.random.default_rng(n))
        assert sorted(order) == list(range(n)) and not (order == np.arange(n)).any()


@pytest.mark.usefixtures("one_torch_thread")
def test_miniature_training_lifts_the_planted_item(tiny_base: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    lake = synthetic_lake(40)
    candidates, sequences, items = lake["candidates"], lake["sequences"], lake["items"]
    links = plant_links(candidates, sequences, items, 1.0, decoy_rate=0.3)
    new_links, triples = studio_facts(links, items, lake["links"])
    kg = build_kg(
        items,
        sequences,
        KGConfig(co_rated_top_n=0),
        entity_links=pl.concat([lake["links"], new_links]),
        entity_triples=triples,
    )
    found = enumerate_paths(
        candidates, sequences, kg.entities, kg.triples, kg.relations, items.height
    )
    flat = found.pair_features.select("user_idx", "path_type").unique().with_columns(weight=1.0)
    selected = select_paths(found.paths, flat).with_columns(variant=pl.lit("lkg_rag"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    prompts = build_prompts(
        candidates,
        sequences,
        dict(items.select("item_idx", "title").iter_rows()),
        selected,
        "lkg_rag",
        PromptConfig(format="segments", max_prompt_tokens=4096),
        lambda text: len(tokenizer(text)["input_ids"]),
    )
    # the cue reaches the true item of nearly every prompt: one line per history item, so a
    # planted history item that also has a studio with another candidate shows only one
    shown = [CUE in s[t] for s, t in prompts.select("segments", "target_index").rows()]
    assert np.mean(shown) >= 0.8, np.mean(shown)
    file = tmp_path / "prompts.parquet"
    prompts.write_parquet(file)
    config = TrainConfig(
        lr=2e-2,
        warmup_steps=0,
        epochs=3,
        batch_size=2,
        grad_accum=2,
        eval_every=1000,
        log_every=1000,
        max_val_examples=None,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"),
        dtype="float32",
    )
    training_function(config, RunPaths(file, tiny_base, tmp_path / "adapter"))
    test = prompts.filter(pl.col("split") == "test")

    def first_share(adapter: Path | None) -> float:
        model = load_ranker(tiny_base, adapter, "cpu", torch.float32)
        ranked = rank_prompts(model, tokenizer, test)
        return float((ranked["target_rank"] == 1).mean())

    before, after = first_share(None), first_share(tmp_path / "adapter")
    assert after >= 0.6 and after > before + 0.4, (before, after)
