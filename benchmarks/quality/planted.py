"""Does the KG → prompt → LoRA → ranking chain carry a signal? A planted-signal dose-response.

    make sanity                                   # python -m benchmarks.quality.planted (resumable)
    python -m benchmarks.quality.planted --report         # rewrite PLANTED.md from what has run
    python -m benchmarks.quality.planted --doses 1.0 0.0  # fewer doses (--variants: fewer variants)

On copies of the ml-100k lake that `make run` wrote (`data_lake/planted/p<dose>/`; the user's lake
is only read), a synthetic relation is planted: a studio shared by two films, written as a
Freebase-like fact (`lkg.film.studio`, read by `core.kg.freebase` as `made_at_studio`) into the
copy's `raw_entity_links` and `raw_entity_triples`, so `kg_triples` reads it as it reads a director
and path enumeration finds "same studio" as it finds "same director". For a fraction `dose` of all
examples (train, val and test alike) a new studio links the true next item to an item of the
example's shown history. A studio is item metadata: the link also shows in every prompt whose
history holds one film and whose candidates the other, so it is planted only from a history item
whose link shows on no wrong candidate of any other train or test prompt (`plant_links`); an
example without one is "blocked" and stays unplanted at every dose (on ml-100k most test examples
whose true item is popular). So the cue marks the target wherever it was planted and nowhere else
but for the decoys: for a fraction DECOY_RATE of examples one more studio links a history item to a
candidate drawn uniformly from all 20 (the true item included, so at dose 0 the relation says
nothing about the answer). The draws are shared across doses: the examples planted at 0.1 are among
those planted at 0.3. Only item metadata changes: no interaction, candidate or split does, so the
retriever, its candidates and the leakage check are the real ones.

The real assets then run on each copy with their default configuration: kg_triples → kg_paths
→ preference_model → selected_paths → prompts → lora_adapter → rankings (test prompts), for
`lkg_rag` at every dose and `kg_rag` at dose 1 (its shortest-path selection, blind to what a
relation is worth, shows the cue on few planted true items, so lower doses would only repeat
that), and for `lkg_rag` at dose 1 with three times the default training budget. Controls:
- swap: the dose-1.0 adapters rank the same test prompts with each candidate's relation line
  moved to another candidate of the same prompt (a derangement), so the cue points elsewhere;
- dose 0: planted decoys only, compared with the real lake's `lkg_rag` rankings;
- `llamarec`: its prompts carry no relation; their sha256 is shown equal at every dose, so it is
  trained and ranked once.

Each finished piece is a file under `data_lake/planted/results/`; a rerun skips it (pieces made
with another DESIGN are set aside whole). The page (PLANTED.md), results.json `planted` and the
dose-response plot are rewritten from those files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import polars as pl
import pyarrow.parquet as pq

from benchmarks.harness import (
    DATASET,
    REPO,
    RESULTS_JSON,
    LakeFiles,
    lake_root,
    machine_info,
    save_results_section,
    table,
)
from lkg_pipeline.core.evaluate.compare import (
    REFERENCE_VARIANT,
    EvaluationConfig,
    evaluate,
    llm_ranks,
    retriever_ranks,
)
from lkg_pipeline.core.io.storage import replace_atomically
from lkg_pipeline.core.paths.preference.model import load_preference

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOSES = (1.0, 0.3, 0.1, 0.0)
KG_VARIANTS = ("lkg_rag", "kg_rag")
DECOY_RATE = 0.1  # examples that get one more studio, on a uniformly drawn candidate
SEED = 0
SCORED_SPLITS = ("train", "test")  # the prompts a planted link must not mislead (plant_links)
WINDOW = 20  # history items a prompt shows (PromptConfig.max_history, PathConfig.history_len)
RELATION = "lkg.film.studio"  # core.kg.freebase reads it as made_at_studio
PATH_TYPE = "made_at_studio"
CUE = "same studio"  # how core.llm.prompts phrases a made_at_studio path
# Inputs of the kg and llm stages: copied, small. The base model is hard-linked (read only;
# every write in the pipeline replaces a file by renaming, so a link is never written through).
COPIED = ("ingest", "prepare", "retrieval")
LINKED = ("models/base_model",)
KG_STAGES = "kg_triples,kg_paths,preference_model,selected_paths"
LLM_STAGES = "prompts,lora_adapter,rankings"
TEST_ONLY = {"ops": {"rankings": {"config": {"splits": ["test"]}}}}
# Arms besides the default run of a condition: the swap control, and three times the default
# training budget (160 train prompts: LoraRunConfig) to see how far more training goes.
SWAP, BIGGER = "swap", "x3"
BIGGER_BUDGET = {"lora_adapter": {"config": {"max_train_examples": 480}}}
HERE = Path(__file__).resolve().parent  # the topic folder: its pages and figures
PAGE = HERE / "PLANTED.md"
FIGURE = HERE / "planted_curve.png"


def work_root(lake: Path) -> Path:
    return lake / "planted"


# What the kept pieces under work_root depend on besides the lake: a run made another way is
# set aside whole (`set_aside_other_design`), never mixed into one page.
DESIGN = {"planting": 2, "decoy_rate": DECOY_RATE, "seed": SEED, "scored": list(SCORED_SPLITS)}


def set_aside_other_design(root: Path) -> None:
    """Moves a work root made with another DESIGN to <root>.superseded (replacing one there)."""
    recorded = root / "design.json"
    if root.exists() and not (recorded.exists() and json.loads(recorded.read_text()) == DESIGN):
        aside = root.with_name(root.name + ".superseded")
        shutil.rmtree(aside, ignore_errors=True)
        root.rename(aside)
        print(f"[planted] {root} was made with another design; moved to {aside}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    if not recorded.exists():
        save_json(recorded, DESIGN)


def lake_of(root: Path, dose: float) -> Path:
    return root / f"p{dose:g}"


def results_dir(root: Path) -> Path:
    return root / "results"


# ----------------------------------------------------------------------------- planting


def histories(sequences: pl.DataFrame) -> dict[int, list[int]]:
    ordered = sequences.sort("user_idx", "position").group_by("user_idx", maintain_order=True)
    return {u: items for u, items in ordered.agg("item_idx").iter_rows()}


def plant_links(
    candidates: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
    dose: float,
    decoy_rate: float = DECOY_RATE,
    seed: int = SEED,
    window: int = WINDOW,
) -> pl.DataFrame:
    """One row per studio drawn: (example_id, split, kind, history_item_idx, item_idx).

    kind "planted" links the example's true item to a shown history item, "decoy" a uniformly
    drawn candidate. A studio is item metadata, so it shows in every prompt whose history holds
    one of its films and whose candidates the other: a link is planted only from a history item
    whose link would show on no wrong candidate of another train or test prompt (the prompts
    the model learns from and is scored on), so the planted cue never points elsewhere there;
    an example without such an item is "blocked" (drawn, not planted: on ml-100k's SASRec
    candidates most test examples whose true item is popular). Of the clean history items the
    one with the fewest such showings in val prompts wins, then the rarest, then the most
    recent. Decoys take the history item with the fewest showings elsewhere, clean or not. The
    random draws depend on the seed only, never on the dose, so doses nest.
    """
    examples = candidates.sort("example_id")
    rng = np.random.default_rng(seed)
    n = examples.height
    plant_draw, decoy_draw, decoy_pick = rng.random(n), rng.random(n), rng.random(n)
    popularity = dict(zip(items["item_idx"].to_list(), items["n_train_interactions"].to_list()))
    history_of = histories(sequences)
    # per group of splits: item → examples whose shown history holds it, and item → examples
    # that offer it not as the true item
    shown_in: dict[bool, dict[int, set[int]]] = {True: {}, False: {}}
    offered_in: dict[bool, dict[int, set[int]]] = {True: {}, False: {}}
    windows = []
    for ex in examples.iter_rows(named=True):
        history = history_of[ex["user_idx"]]
        if history[ex["prefix_len"]] != ex["target_item_idx"]:
            raise ValueError(
                f"example {ex['example_id']}: item {ex['prefix_len']} of user {ex['user_idx']}'s "
                "sequence is not its target; candidates and sequences disagree"
            )
        shown = history[: ex["prefix_len"]][-window:]
        windows.append(shown)
        scored = ex["split"] in SCORED_SPLITS
        for item in shown:
            shown_in[scored].setdefault(item, set()).add(ex["example_id"])
        for item in ex["candidate_item_idxs"]:
            if item != ex["target_item_idx"]:
                offered_in[scored].setdefault(item, set()).add(ex["example_id"])

    def elsewhere(a: int, b: int, example_id: int, scored: bool) -> int:
        shown, offered = shown_in[scored], offered_in[scored]
        seen = (shown.get(a, set()) & offered.get(b, set())) | (
            shown.get(b, set()) & offered.get(a, set())
        )
        return len(seen - {example_id})

    def anchor_key(h: int, item: int, example_id: int, planted: bool) -> tuple[int, ...]:
        scored, val = elsewhere(h, item, example_id, True), elsewhere(h, item, example_id, False)
        return (
            (scored, val, popularity.get(h, 0)) if planted else (scored + val, popularity.get(h, 0))
        )

    rows = []
    for i, ex in enumerate(examples.iter_rows(named=True)):
        chosen = []
        if plant_draw[i] < dose:
            chosen.append(("planted", ex["target_item_idx"]))
        if decoy_draw[i] < decoy_rate:
            pool = ex["candidate_item_idxs"]
            chosen.append(("decoy", pool[int(decoy_pick[i] * len(pool))]))
        for kind, item in chosen:
            keys = {
                h: anchor_key(h, item, ex["example_id"], kind == "planted")
                for h in reversed(windows[i])
            }
            anchor = min(keys, key=keys.__getitem__)  # the first minimum: the most recent
            if kind == "planted" and keys[anchor][0]:
                kind = "blocked"
            rows.append(
                {
                    "example_id": ex["example_id"],
                    "split": ex["split"],
                    "history_item_idx": anchor,
                    "kind": kind,
                    "item_idx": item,
                }
            )
    schema = {
        "example_id": pl.Int64,
        "split": pl.String,
        "history_item_idx": pl.Int32,
        "kind": pl.String,
        "item_idx": pl.Int32,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")


def studio_facts(
    links: pl.DataFrame, items: pl.DataFrame, entity_links: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(entity links to add, triples to add): one studio node per distinct linked item pair.

    A film without a Freebase id gets a made-up one, so that every item can take a studio.
    """
    known = entity_links.unique("item_id", keep="first", maintain_order=True)
    films = (
        items.select("item_idx", "item_id")
        .join(known, on="item_id", how="left")
        .with_columns(
            entity_id=pl.coalesce("entity_id", pl.format("m.lkg_film_{}", pl.col("item_id")))
        )
    )
    new_links = films.join(known, on="item_id", how="anti").select(entity_links.columns)
    pairs = (
        links.filter(
            pl.col("kind").is_in(["planted", "decoy"])
            & (pl.col("history_item_idx") != pl.col("item_idx"))
        )
        .select("history_item_idx", "item_idx")
        .unique(maintain_order=True)
        .with_columns(studio=pl.format("m.lkg_studio_{}", pl.int_range(pl.len())))
    )
    mid = films.select("item_idx", "entity_id")
    sides = [
        pairs.join(mid, left_on=column, right_on="item_idx").select(
            head="entity_id", relation=pl.lit(RELATION), tail="studio"
        )
        for column in ("history_item_idx", "item_idx")
    ]
    return new_links.cast(entity_links.schema), pl.concat(sides).sort("tail", "head")


def plant_lake(source: Path, target: Path, dose: float) -> dict[str, Any]:
    """A copy of `source`'s inputs under `target`, with studios planted at `dose`."""
    building = target.with_name(target.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    for folder in COPIED:
        shutil.copytree(source / folder, building / folder)
    for folder in LINKED:
        shutil.copytree(source / folder, building / folder, copy_function=os.link)
    read = {
        name: pl.read_parquet(building / group / name / f"{DATASET}.parquet")
        for group, name in (
            ("retrieval", "candidates"),
            ("prepare", "sequences"),
            ("prepare", "items"),
            ("ingest", "raw_entity_links"),
            ("ingest", "raw_entity_triples"),
        )
    }
    links = plant_links(read["candidates"], read["sequences"], read["items"], dose)
    new_links, new_triples = studio_facts(links, read["items"], read["raw_entity_links"])
    for name, extra in (("raw_entity_links", new_links), ("raw_entity_triples", new_triples)):
        file = building / "ingest" / name / f"{DATASET}.parquet"
        pl.concat([read[name], extra.cast(read[name].schema)]).write_parquet(file)
    links.write_parquet(building / "planted_links.parquet")
    building.rename(target)
    counts = links.group_by("split", "kind").len().sort("split", "kind")
    return {"dose": dose, "studios": new_triples["tail"].n_unique(), "links": counts.to_dicts()}


# ----------------------------------------------------------------------------- runs


def materialize(
    root: Path, lake: Path, select: str, partition: str, config: dict | None, log: Path
) -> None:
    """The real assets through Dagster's CLI, on `lake` with the benchmark's own instance."""
    home = root / "dagster_home"
    env = os.environ | {"LKG_DATA_LAKE": str(lake), "DAGSTER_HOME": str(home)}
    binary = Path(sys.executable).parent
    if not (home / "dagster.yaml").exists():
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        subprocess.run([binary / "dagster", "instance", "migrate"], env=env, check=True)
    subprocess.run([sys.executable, "-m", "lkg_pipeline.defs.dead_runs"], env=env, check=True)
    command = [
        str(binary / "dagster"),
        "asset",
        "materialize",
        "-m",
        "lkg_pipeline.definitions",
        "--select",
        select,
        "--partition",
        partition,
    ]
    if config:
        command += ["--config-json", json.dumps(config)]
    print(f"[planted] {lake.name}: {select} ({partition})", flush=True)
    with log.open("a") as out:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{select} on {lake} failed; see {log}")


def save_json(path: Path, value: Any) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))


def prompts_file(lake: Path, variant: str) -> Path:
    return lake / "llm" / "prompts" / DATASET / f"{variant}.parquet"


def rankings_file(lake: Path, variant: str) -> Path:
    return lake / "evaluate" / "rankings" / DATASET / f"{variant}.parquet"


def preference_weight(lake: Path) -> dict[str, Any]:
    """The preference module's type weight on the studio, where it stands among types, and the
    module's own validation NDCG@10 (its ranking of the candidates by their paths)."""
    folder = lake / "models" / "preference" / DATASET
    model = load_preference(folder)
    trained = json.loads((folder / "training.json").read_text())
    val_ndcg10 = trained["val_ndcg10_by_encoder"][trained["encoder"]]
    effective = (model.type_weight() * model.idf).detach().numpy()
    order = np.argsort(-effective)
    if PATH_TYPE not in model.path_types:
        return {"path_types": len(model.path_types), "weight": None, "val_ndcg10": val_ndcg10}
    t = model.path_types.index(PATH_TYPE)
    return {
        "val_ndcg10": val_ndcg10,
        "path_types": len(model.path_types),
        "weight": float(model.type_weight()[t].detach()),
        "idf": float(model.idf[t]),
        "weight_x_idf": float(effective[t]),
        "rank_of_type": int(np.where(order == t)[0][0]) + 1,
        "top_type": model.path_types[int(order[0])],
    }


def cue_places(lake: Path, variant: str) -> pl.DataFrame:
    """(example_id, on_target, on_others) of each test prompt whose true item is a candidate:
    whether the cue shows on the true item, and on how many of the other 19 candidates."""
    prompts = pl.read_parquet(prompts_file(lake, variant)).filter(
        (pl.col("split") == "test") & (pl.col("target_index") >= 0)
    )
    rows = []
    for example, segments, target in prompts.select(
        "example_id", "segments", "target_index"
    ).iter_rows():
        shows = [CUE in segment for segment in segments]
        rows.append((example, shows[target], sum(shows) - shows[target]))
    schema = {"example_id": pl.Int64, "on_target": pl.Boolean, "on_others": pl.Int64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def cue_shares(lake: Path, variant: str) -> dict[str, Any]:
    """How often the cue reached the test prompts: on the true item when it was planted there,
    and on the other candidates (decoys and links that other examples planted)."""
    places = cue_places(lake, variant)
    planted = pl.read_parquet(lake / "planted_links.parquet").filter(pl.col("kind") == "planted")
    on_planted = places.filter(pl.col("example_id").is_in(planted["example_id"].implode()))
    n = places.height
    return {
        "test_prompts": n,
        "planted_test_prompts": on_planted.height,
        "cue_on_planted_target": on_planted["on_target"].mean() if on_planted.height else None,
        "cue_on_target": places["on_target"].sum() / n,
        "cue_per_other_candidate": places["on_others"].sum() / (n * 19),
    }


CASES = ("on the true item only", "on the true item and others", "on others only", "nowhere")


def cue_cases(lake: Path, variant: str) -> pl.DataFrame:
    """(example_id, case) of each test prompt: where the cue shows (CASES)."""
    places = cue_places(lake, variant)
    case = (
        pl.when(pl.col("on_target") & (pl.col("on_others") == 0))
        .then(pl.lit(CASES[0]))
        .when(pl.col("on_target"))
        .then(pl.lit(CASES[1]))
        .when(pl.col("on_others") > 0)
        .then(pl.lit(CASES[2]))
        .otherwise(pl.lit(CASES[3]))
    )
    return places.select("example_id", case.alias("case"))


def by_case(rankings: pl.DataFrame, cases: pl.DataFrame) -> list[dict[str, Any]]:
    """Share ranked first and mean rank of the true item, per place of the cue."""
    joined = rankings.join(cases, on="example_id").group_by("case")
    table = joined.agg(
        prompts=pl.len(),
        first=(pl.col("target_rank") == 1).mean(),
        mean_rank=pl.col("target_rank").mean(),
    )
    order = {case: i for i, case in enumerate(CASES)}
    return sorted(table.to_dicts(), key=lambda row: order[row["case"]])


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    while True:
        order = rng.permutation(n)
        if n < 2 or not (order == np.arange(n)).any():
            return order


def swap_relations(segments: Sequence[str], rng: np.random.Generator) -> list[str]:
    """Each candidate's "Relations: …" line moved to another candidate of the same prompt."""
    lines = [segment.split("\n") for segment in segments]
    relation = [next((x for x in part if x.startswith("Relations: ")), None) for part in lines]
    order = derangement(len(segments), rng)
    out = []
    for i, part in enumerate(lines):
        kept = [x for x in part if not x.startswith("Relations: ")]
        moved = relation[order[i]]
        out.append("\n".join(kept[:-1] + ([moved] if moved else []) + kept[-1:]))
    return out


def swapped_prompts(file: Path, seed: int = SEED) -> Any:
    """The prompts table (with its Parquet metadata) with every test prompt's relations swapped."""
    arrow = pq.read_table(file)
    frame = pl.from_arrow(arrow)
    rng = np.random.default_rng(seed)
    segments = [
        swap_relations(s, rng) if split == "test" else s
        for s, split in zip(frame["segments"].to_list(), frame["split"].to_list())
    ]
    column = arrow.schema.get_field_index("segments")
    swapped = pl.Series("segments", segments, dtype=pl.List(pl.String)).to_arrow()
    return arrow.set_column(column, arrow.schema.field(column), swapped)


def run_condition(
    root: Path, lake: Path, variant: str, name: str, log: Path, arm: str = ""
) -> None:
    """Prompts → adapter → test rankings of `variant` on `lake`, kept as results/<name>;
    `arm` SWAP ranks the same adapter on swapped prompts, BIGGER trains on more prompts."""
    out = results_dir(root) / f"{name}.parquet"
    if out.exists():
        return
    start = time.time()
    partition = f"{DATASET}|{variant}"
    swap = arm == SWAP
    if not swap:
        config = TEST_ONLY if arm != BIGGER else {"ops": TEST_ONLY["ops"] | BIGGER_BUDGET}
        materialize(root, lake, LLM_STAGES, partition, config, log)
        if variant != REFERENCE_VARIANT and not arm:
            save_json(results_dir(root) / f"{name}.cues.json", cue_shares(lake, variant))
    else:
        original = prompts_file(lake, variant)
        keep = original.with_suffix(".unswapped")
        ranked = rankings_file(lake, variant)
        ranked_keep = ranked.with_suffix(".unswapped")
        if not keep.exists():
            shutil.copy2(original, keep)
            shutil.copy2(ranked, ranked_keep)
        replace_atomically(original, lambda tmp: pq.write_table(swapped_prompts(keep), tmp))
        try:
            materialize(root, lake, "rankings", partition, TEST_ONLY, log)
            shutil.copy2(rankings_file(lake, variant), out.with_suffix(".tmp"))
        finally:
            os.replace(keep, original)
            os.replace(ranked_keep, ranked)
    if not swap:
        shutil.copy2(rankings_file(lake, variant), out.with_suffix(".tmp"))
    os.replace(out.with_suffix(".tmp"), out)
    save_json(results_dir(root) / f"{name}.time.json", {"seconds": time.time() - start})


def run_all(lake: Path, doses: Sequence[float], variants: Sequence[str]) -> None:
    """Every piece not yet on disk, most telling first: the first variant at the strongest
    dose, its swap and its larger budget, the reference, dose 0, the lower doses; then the
    other variants at the strongest dose only (`kg_rag`'s shortest-path selection shows the
    cue in few prompts: PLANTED.md)."""
    root = work_root(lake)
    set_aside_other_design(root)
    results_dir(root).mkdir(parents=True, exist_ok=True)
    log = root / "runs.log"

    def ready(dose: float) -> Path:
        target = lake_of(root, dose)
        if not target.exists():
            save_json(
                results_dir(root) / f"p{dose:g}.planting.json", plant_lake(lake, target, dose)
            )
        done = results_dir(root) / f"p{dose:g}.preference.json"
        if not done.exists():
            materialize(root, target, KG_STAGES, DATASET, None, log)
            materialize(root, target, "prompts", f"{DATASET}|{REFERENCE_VARIANT}", None, log)
            digest = {"llamarec_prompts_sha256": prompt_digest(target, REFERENCE_VARIANT)}
            save_json(done, preference_weight(target) | digest)
        return target

    strongest = max(doses)
    first, *others = variants
    target = ready(strongest)
    run_condition(root, target, first, f"p{strongest:g}_{first}", log)
    run_condition(root, target, first, f"p{strongest:g}_{first}_{SWAP}", log, SWAP)
    run_condition(root, target, first, f"p{strongest:g}_{first}_{BIGGER}", log, BIGGER)
    run_condition(root, target, REFERENCE_VARIANT, REFERENCE_VARIANT, log)
    for dose in sorted((d for d in doses if d != strongest), key=lambda d: (d != 0.0, -d)):
        run_condition(root, ready(dose), first, f"p{dose:g}_{first}", log)
    for variant in others:
        run_condition(root, ready(strongest), variant, f"p{strongest:g}_{variant}", log)


def prompt_digest(lake: Path, variant: str) -> str:
    frame = pl.read_parquet(prompts_file(lake, variant)).sort("example_id")
    text = json.dumps([frame["prompt"].to_list(), frame["segments"].to_list()])
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- report


def planted_first(root: Path, dose: float, rankings: pl.DataFrame) -> float | None:
    """Share of planted test prompts (true item among the candidates) ranked first."""
    links = root / f"p{dose:g}" / "planted_links.parquet"
    if not links.exists() or dose == 0:
        return None
    planted = pl.read_parquet(links).filter(
        (pl.col("kind") == "planted") & (pl.col("split") == "test")
    )
    rows = rankings.join(planted.select("example_id"), on="example_id", how="semi").filter(
        pl.col("target_rank").is_not_null()
    )
    return float((rows["target_rank"] == 1).mean()) if rows.height else None


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def conditions(root: Path) -> list[dict[str, Any]]:
    """Every finished condition: (name, dose, variant, arm, rankings)."""
    found = []
    for file in sorted(results_dir(root).glob("*.parquet")):
        name = file.stem
        if name == REFERENCE_VARIANT:
            found.append({"name": name, "dose": None, "variant": name, "arm": ""})
            continue
        dose_part, rest = name.split("_", 1)
        arm = next((a for a in (SWAP, BIGGER) if rest.endswith(f"_{a}")), "")
        variant = rest.removesuffix(f"_{arm}") if arm else rest
        found.append({"name": name, "dose": float(dose_part[1:]), "variant": variant, "arm": arm})
    for row in found:
        row["rankings"] = pl.read_parquet(results_dir(root) / f"{row['name']}.parquet")
    return found


def compare(
    candidates: pl.DataFrame, mine: pl.DataFrame, baselines: dict[str, pl.DataFrame], variant: str
) -> dict[str, Any]:
    """Test metrics of one condition with intervals, and its paired p against the retriever
    and each of `baselines` (named as the page shows them)."""
    out: dict[str, Any] = {}
    # `evaluate` pairs a KG variant with the retriever and with `llamarec`: each other
    # baseline takes llamarec's place in an evaluation of its own
    for name, other in {REFERENCE_VARIANT: None, **baselines}.items():
        ranks = [retriever_ranks(candidates), llm_ranks(candidates, mine, variant)]
        if other is not None:
            ranks.append(llm_ranks(candidates, other, REFERENCE_VARIANT))
        evaluation = evaluate(pl.concat(ranks), EvaluationConfig())
        for population in ("subset", "overall"):
            for metric in ("NDCG@10", "MRR@1"):
                key = f"{population} {metric}"
                if key not in out:
                    row = evaluation.metrics.filter(
                        (pl.col("ranker") == variant)
                        & (pl.col("split") == "test")
                        & (pl.col("population") == population)
                        & (pl.col("metric") == metric)
                    ).row(0, named=True)
                    out[key] = {"value": row["value"], "ci": [row["ci_low"], row["ci_high"]]}
                for baseline, shown in (("retriever", "retriever"), (REFERENCE_VARIANT, name)):
                    hit = evaluation.comparisons.filter(
                        (pl.col("ranker") == variant)
                        & (pl.col("baseline") == baseline)
                        & (pl.col("split") == "test")
                        & (pl.col("population") == population)
                        & (pl.col("metric") == metric)
                    )
                    if hit.height and f"vs {shown}" not in out[key]:
                        c = hit.row(0, named=True)
                        out[key][f"vs {shown}"] = {
                            "difference": c["difference"],
                            "baseline": c["baseline_value"],
                            "p": c["p_value"],
                        }
    return out


def report(lake: Path) -> dict[str, Any]:
    root = work_root(lake)
    candidates = pl.read_parquet(LakeFiles(lake).candidates)
    found = conditions(root)
    by_name = {row["name"]: row for row in found}
    reference_table = by_name.get(REFERENCE_VARIANT, {}).get("rankings")
    real = rankings_file(lake, "lkg_rag")
    rows = []
    for row in found:
        # llamarec is itself the variant-free reference, compared with the retriever only
        baselines: dict[str, pl.DataFrame] = {}
        if row["variant"] != REFERENCE_VARIANT and reference_table is not None:
            baselines[REFERENCE_VARIANT] = reference_table
        if row["dose"] == 0.0 and row["variant"] == "lkg_rag" and real.exists():
            baselines["real lake lkg_rag"] = pl.read_parquet(real)
        metrics = compare(candidates, row["rankings"], baselines, row["variant"])
        dose = row["dose"]
        rows.append(
            {
                "condition": row["name"],
                "dose": dose,
                "variant": row["variant"],
                "arm": row["arm"],
                "metrics": metrics,
                "planted_target_first": planted_first(root, dose, row["rankings"])
                if dose is not None
                else None,
                "cues": read_json(results_dir(root) / f"p{dose:g}_{row['variant']}.cues.json")
                if row["variant"] != REFERENCE_VARIANT
                else None,
                "seconds": (read_json(results_dir(root) / f"{row['name']}.time.json") or {}).get(
                    "seconds"
                ),
                "by_cue": by_case(row["rankings"], cue_cases(lake_of(root, dose), row["variant"]))
                if dose is not None and lake_of(root, dose).exists()
                else None,
            }
        )
    doses = sorted({r["dose"] for r in rows if r["dose"] is not None}, reverse=True)
    section = {
        "machine": machine_info(),
        "decoy_rate": DECOY_RATE,
        "seed": SEED,
        "conditions": rows,
        "preference": {
            f"{d:g}": read_json(results_dir(root) / f"p{d:g}.preference.json") for d in doses
        },
        "planting": {
            f"{d:g}": read_json(results_dir(root) / f"p{d:g}.planting.json") for d in doses
        },
        "llamarec_prompt_sha256": {
            f"{d:g}": (read_json(results_dir(root) / f"p{d:g}.preference.json") or {}).get(
                "llamarec_prompts_sha256"
            )
            for d in doses
        },
    }
    section["detection_floor"] = detection_floor(rows)
    curve_figure(rows, FIGURE)
    save_results_section(RESULTS_JSON, "planted", section)
    PAGE.write_text(page(section))
    return section


def detection_floor(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per KG variant and baseline (the retriever, `llamarec`), the weakest dose whose test
    NDCG@10 (overall) beats the baseline at p < 0.05, every stronger dose too (None: not even
    the strongest)."""
    floors: dict[str, dict[str, float | None]] = {}
    for variant in KG_VARIANTS:
        runs = sorted(
            (r for r in rows if r["variant"] == variant and not r["arm"] and r["dose"]),
            key=lambda r: -r["dose"],
        )
        if not runs:
            continue
        floors[variant] = {}
        for baseline in ("retriever", REFERENCE_VARIANT):
            floor = None
            for r in runs:
                versus = r["metrics"]["overall NDCG@10"].get(f"vs {baseline}", {})
                if versus.get("difference", 0) > 0 and versus.get("p", 1) < 0.05:
                    floor = r["dose"]
                else:
                    break
            floors[variant][f"vs {baseline}"] = floor
    return floors


def curve_figure(rows: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, population in zip(axes, ("subset", "overall")):
        key = f"{population} NDCG@10"
        for variant, marker in (("lkg_rag", "o-"), ("kg_rag", "s-")):
            runs = sorted(
                (r for r in rows if r["variant"] == variant and not r["arm"]),
                key=lambda r: r["dose"],
            )
            if runs:
                x = [r["dose"] for r in runs]
                y = [r["metrics"][key]["value"] for r in runs]
                low = [r["metrics"][key]["value"] - r["metrics"][key]["ci"][0] for r in runs]
                high = [r["metrics"][key]["ci"][1] - r["metrics"][key]["value"] for r in runs]
                ax.errorbar(x, y, yerr=[low, high], fmt=marker, label=variant, capsize=3)
            for r in (r for r in rows if r["variant"] == variant and r["arm"]):
                marker = "x" if r["arm"] == SWAP else "*"
                label = f"{variant}, {'swap' if r['arm'] == SWAP else '3× training'}"
                ax.plot(r["dose"], r["metrics"][key]["value"], marker, ms=9, label=label)
        any_row = next((r for r in rows), None)
        if any_row:
            base = any_row["metrics"][key].get("vs retriever", {}).get("baseline")
            if base is not None:
                ax.axhline(base, color="grey", ls="--", label="retriever")
        ref = next((r for r in rows if r["variant"] == REFERENCE_VARIANT), None)
        if ref:
            ax.axhline(ref["metrics"][key]["value"], color="tab:green", ls=":", label="llamarec")
        ax.set(xlabel="dose (share of the plantable examples planted)", ylabel=key)
        ax.set_title(f"test, {population}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def page(section: dict[str, Any]) -> str:
    rows = []
    for r in sorted(
        section["conditions"],
        key=lambda r: (r["variant"], r["arm"], -(r["dose"] if r["dose"] is not None else 9)),
    ):
        m = r["metrics"]
        cells = {
            "variant": r["variant"] + (f" ({r['arm']})" if r["arm"] else ""),
            "dose": "–" if r["dose"] is None else f"{r['dose']:g}",
        }
        for key in ("subset NDCG@10", "overall NDCG@10", "overall MRR@1"):
            low, high = m[key]["ci"]
            cells[key] = f"{m[key]['value']:.4f} [{low:.4f}, {high:.4f}]"
        for baseline in ("retriever", REFERENCE_VARIANT, "real lake lkg_rag"):
            versus = m["overall NDCG@10"].get(f"vs {baseline}")
            cells[f"Δ NDCG@10 vs {baseline} (p)"] = (
                f"{versus['difference']:+.4f} ({versus['p']:.4f})" if versus else "–"
            )
        cues = r["cues"] or {}
        cells["planted test prompts"] = cues.get("planted_test_prompts", "–")
        cells["planted first"] = _fmt(r["planted_target_first"], 3)
        cells["cue on planted target"] = _fmt(cues.get("cue_on_planted_target"), 3)
        cells["cue per other candidate"] = _fmt(cues.get("cue_per_other_candidate"), 3)
        rows.append(cells)
    weights = [
        {
            "dose": dose,
            **{
                k: round(v, 3) if isinstance(v, float) else v
                for k, v in (w or {}).items()
                if k != "llamarec_prompts_sha256"
            },
        }
        for dose, w in section["preference"].items()
    ]
    cases = [
        {
            "condition": r["condition"],
            "cue": c["case"],
            "prompts": c["prompts"],
            "true item first": f"{c['first']:.3f}",
            "its mean rank": f"{c['mean_rank']:.2f}",
        }
        for r in section["conditions"]
        if r["by_cue"] and r["arm"] != SWAP and r["dose"]
        for c in r["by_cue"]
    ]
    machine = section["machine"]
    return "\n".join(
        [
            "# Planted signal: does the KG → prompt → LoRA → ranking chain carry a cue?",
            "",
            "Written by `make sanity` (`python -m benchmarks.quality.planted`; `--report` rewrites "
            "it from the finished runs). How the studio relation is planted and why: the module's "
            "docstring. Test split of ml-100k, 943 users; subset = users whose true item is a "
            "candidate; intervals: 95% bootstrap over users; p: paired sign-flip test.",
            "",
            f"Machine: {machine.get('cpu_model', machine)}; decoy rate {section['decoy_rate']}, "
            f"seed {section['seed']}.",
            "",
            "![dose-response](planted_curve.png)",
            "",
            table(rows) if rows else "No condition has finished yet.",
            "",
            "Detection floor (the weakest dose whose overall NDCG@10 beats the baseline at "
            "p < 0.05, every stronger dose too; None: not even the strongest), per variant and "
            f"baseline: {section['detection_floor']}.",
            "",
            "## By where the cue shows in the test prompt",
            "",
            "A planted link shows on no wrong candidate of a train or test prompt; a decoy may, "
            "and a prompt shows one relation line per history item. So the cue sits on the true "
            "item alone, on it and on a decoy's candidate, on others only (a decoy, or a planted "
            "line lost to selection), or nowhere (not planted: not drawn, or blocked).",
            "",
            table(cases) if cases else "–",
            "",
            "## The preference module: its weight on the planted path type, its validation NDCG@10",
            "",
            table(weights) if weights else "–",
            "",
            "`llamarec` prompts, sha256 per planted lake (equal: it cannot see the studio): "
            f"{section['llamarec_prompt_sha256']}",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only rewrite the page")
    parser.add_argument("--doses", type=float, nargs="+", default=list(DOSES))
    parser.add_argument("--variants", nargs="+", default=list(KG_VARIANTS))
    args = parser.parse_args(argv)
    lake = lake_root()
    if not args.report:
        run_all(lake, args.doses, args.variants)
    report(lake)
    print(f"wrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
