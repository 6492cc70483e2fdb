"""`make quality`: does the LLM ranker earn its place? Every ranker side by side on ml-100k.

    python -m benchmarks.quality.rankers            # everything below, resuming what is cached
    python -m benchmarks.quality.rankers --only lkg_rag-letters-zero_shot,lkg_rag-segments-tuned
    python -m benchmarks.quality.rankers --report   # re-render QUALITY.md from the cached rankings

Rows (each scored on the whole val and test subset, i.e. every user whose true item is among
the retriever's 20): the retriever, the preference module, and for each variant and prompt
format the zero-shot base model and the fine-tuned adapter, each also fused with the
retriever's scores (`+prior`, λ and calibration chosen on val only, core.llm.rank.fusion); the
learned rerankers of the report over the KG's explicit features (`ltr`) and with the tuned
`lkg_rag` row's score as one more (`ltr+llm`); and `served`, the ranker the pipeline's rule
(core.evaluate.serving) picks among all of them on validation. Paired randomisation tests
against the retriever and against `llamarec` of the same format and training (for `ltr`,
`ltr+llm` and `served`: the tuned `llamarec`), on test overall (943 users), as the report of
the pipeline computes them.

Everything is cached under `data_lake/quality/` (each format's prompts, built here from the
lake's candidates, sequences, items and selected paths; per row the adapter, its training log,
the rankings), so an interrupted run resumes where it stopped and `--report` costs seconds. The
recipe of the tuned rows is `RECIPE` below: `lora_adapter`'s defaults at a larger budget. A
cached row trained with another recipe, or made from prompts that have since been rebuilt (the
lake changed under it), is moved to `data_lake/quality/superseded/` and run again.
Writes benchmarks/quality/QUALITY.md and the `quality` section of benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from benchmarks.harness import (
    DATASET,
    RESULTS_JSON,
    LakeFiles,
    lake_root,
    machine_info,
    save_results_section,
)
from lkg_pipeline.core.evaluate.compare import (
    PREFERENCE,
    PRIOR_SUFFIX,
    RETRIEVER,
    SIGNIFICANCE,
    EvaluationConfig,
    evaluate,
    example_based_ranks,
    llm_ranks,
    paired_randomization_test,
    retriever_ranks,
)
from lkg_pipeline.core.evaluate.ltr_features import read_pair_features
from lkg_pipeline.core.evaluate.metrics import per_user_metrics
from lkg_pipeline.core.evaluate.rankers import (
    MIN_LTR_EXAMPLES,
    LlmRankers,
    LtrRanker,
    choice_ranks,
    learnable_val_examples,
    ltr_rankers,
)
from lkg_pipeline.core.evaluate.serving import (
    LTR,
    LTR_LLM,
    ServedChoice,
    choose_served,
    served_lines,
    served_summary,
)
from lkg_pipeline.core.io.fingerprints import content_digest
from lkg_pipeline.core.io.storage import replace_atomically, write_parquet_atomic
from lkg_pipeline.core.llm.rank.fusion import cross_fitted_val_ranks, fused_ranks
from lkg_pipeline.core.llm.rank.job import choose_paths
from lkg_pipeline.core.llm.rank.scoring import load_ranker, rank_prompts, trained_over
from lkg_pipeline.core.llm.train.config import RunPaths, TrainConfig
from lkg_pipeline.core.llm.train.loop import training_function
from lkg_pipeline.core.paths.enumeration import PATH_SETTINGS_FILE
from lkg_pipeline.core.paths.preference.grid import read_path_types
from lkg_pipeline.core.paths.preference.ranking import preference_scores

VARIANTS = ("llamarec", "kg_rag", "lkg_rag")
HERE = Path(__file__).resolve().parent  # the topic folder: its pages and figures
QUALITY_MD = HERE / "QUALITY.md"


@dataclass(frozen=True)
class Row:
    variant: str
    format: str  # letters | segments
    tuned: bool
    # trained over the retriever's scores (TrainConfig.retriever_prior): its `+prior` row is
    # the ranker it was trained to be
    over_retriever: bool = False
    # the training candidates: the retriever's top 20 (the pipeline's, hard negatives) or the
    # target and 19 uniform negatives (the reference's; UNIFORM below)
    negatives: str = "retriever"

    @property
    def kind(self) -> str:
        if self.over_retriever:
            return "residual"
        if self.negatives == "uniform":
            return "tuned_uniform"
        return "tuned" if self.tuned else "zero_shot"

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.format}-{self.kind}"

    @property
    def recipe(self) -> TrainConfig:
        return RESIDUAL_RECIPE if self.over_retriever else RECIPE


# What a cached artefact was made from: a quality prompts file records the digests of its lake
# inputs in its Parquet metadata, a row folder the digests of the prompts it was trained and
# scored on in `inputs.json`. A rebuilt lake (other candidates, paths, base model) then rebuilds
# the prompts and sets aside the rows made from the old ones, instead of reporting them.
INPUTS_KEY = "lkg_pipeline.quality_inputs"
ROW_INPUTS = "inputs.json"


def digests(files: dict[str, Path]) -> dict[str, str]:
    return {name: content_digest(path) for name, path in files.items()}


def built_from(target: Path, made_from: dict[str, Any], sources: Iterable[Path]) -> bool:
    """Whether the cached `target` was made from `made_from`. A file from before records were
    kept counts as current unless one of its `sources` was written after it."""
    if not target.exists():
        return False
    recorded = pl.read_parquet_metadata(target).get(INPUTS_KEY)
    if recorded is not None:
        return json.loads(recorded) == made_from
    return not written_after(target, sources)


def written_after(target: Path, sources: Iterable[Path]) -> bool:
    """Whether any existing file among (or under) `sources` is newer than `target`."""
    made = target.stat().st_mtime
    for source in sources:
        files = source.rglob("*") if source.is_dir() else [source]
        if any(f.is_file() and f.stat().st_mtime > made for f in files):
            return True
    return False


def row_prompt_files(lake: Path, row: Row) -> dict[str, Path]:
    """The prompts a row is scored on, and for a tuned row, trained on."""
    files = {"prompts": prompts_file(lake, row.variant, row.format)}
    if row.tuned and train_prompts_file(lake, row) != files["prompts"]:
        files["train_prompts"] = train_prompts_file(lake, row)
    return files


def row_inputs(lake: Path, row: Row) -> dict[str, str]:
    return {**digests(row_prompt_files(lake, row)), "base_model": base_model(lake).name}


def made_from_current_prompts(lake: Path, row: Row) -> bool:
    """Whether the row's cached adapter and rankings were made from its prompts as they are
    now (a row with nothing cached is). A row from before `inputs.json` was written counts as
    current unless its prompts were written after its rankings or its training log."""
    folder = lake / "quality" / row.name
    record = folder / ROW_INPUTS
    if record.exists():
        return json.loads(record.read_text()) == row_inputs(lake, row)
    made = [folder / "rankings.parquet", folder / "adapter" / "training.json"]
    prompts = row_prompt_files(lake, row).values()
    return not any(written_after(f, prompts) for f in made if f.exists())


def prepare_row(lake: Path, row: Row) -> None:
    """Build (or find current) the row's prompts; set the row's cache aside if it was made from
    other prompts; record the prompts the row is now made from."""
    build_format_prompts(lake, row.variant, row.format, PROMPT_TOKENS)
    if row.negatives == "uniform":
        build_uniform_prompts(lake, row)
    folder = lake / "quality" / row.name
    if folder.exists() and not made_from_current_prompts(lake, row):
        superseded(lake, row, "made from prompts that have since been rebuilt")
    folder.mkdir(parents=True, exist_ok=True)
    record = json.dumps(row_inputs(lake, row), indent=1)
    replace_atomically(folder / ROW_INPUTS, lambda tmp: tmp.write_text(record))


def train_prompts_file(lake: Path, row: Row) -> Path:
    """Where the row's training prompts are (val/test prompts are every row's own format's)."""
    if row.negatives == "uniform":
        return lake / "quality" / "prompts" / f"{row.variant}-{row.format}-uniform.parquet"
    return prompts_file(lake, row.variant, row.format)


UNIFORM_ID_OFFSET = 10_000_000  # the uniform rows' train example ids, apart from the pipeline's


def build_uniform_prompts(lake: Path, row: Row) -> Path:
    """The row's train prompts: the pipeline's train prefixes and targets (one per user, seed
    42 as `candidates`), each with 19 negatives drawn uniformly from the items the user never
    rated in train (`training_candidates(policy="random")`), their paths enumerated and
    selected with the pipeline's settings; followed by the format's own val/test prompts, so
    the row is validated on the same prompts as every other. Cached."""
    target = train_prompts_file(lake, row)
    sources = uniform_prompt_sources(lake, row)
    made_from = {**digests(sources), "base_model": base_model(lake).name}
    if built_from(target, made_from, sources.values()):
        return target
    from transformers import AutoTokenizer

    from lkg_pipeline.core.kg.warehouse import read_parquet
    from lkg_pipeline.core.llm.prompts import (
        PATHS_KEY,
        PromptConfig,
        build_prompts,
        truncate_titles,
    )
    from lkg_pipeline.core.paths.enumeration import PathConfig, write_paths
    from lkg_pipeline.core.paths.selection import PathSelection, select_paths
    from lkg_pipeline.core.retrieval.candidates import training_candidates
    from lkg_pipeline.core.retrieval.sequences import user_sequences

    work = lake / "quality" / "uniform"
    sequences = pl.read_parquet(LakeFiles(lake).sequences)
    items = pl.read_parquet(LakeFiles(lake).items)
    data = user_sequences(sequences, n_items=items.height)
    examples = (
        training_candidates(data, "random", n_candidates=20, examples_per_user=1, seed=42)
        .with_columns(split=pl.lit("train"), in_candidates=pl.lit(True))
        .sort("user_idx", "prefix_len")
        .with_row_index("example_id", offset=UNIFORM_ID_OFFSET)
        .with_columns(pl.col("example_id").cast(pl.Int64))
    )
    kg_paths = lake / "paths" / "kg_paths" / DATASET
    path_config = PathConfig(**json.loads((kg_paths / PATH_SETTINGS_FILE).read_text()))
    kg = read_parquet(LakeFiles(lake).kg)
    paths_dir = work / "paths"
    write_paths(
        examples,
        sequences,
        kg.entities,
        kg.triples,
        kg.relations,
        items.height,
        paths_dir,
        path_config,
    )
    selected_file = lake / "paths" / "selected_paths" / f"{DATASET}.parquet"
    selection = PathSelection.from_dict(
        json.loads(pl.read_parquet_metadata(selected_file)[PATHS_KEY])["selection"]
    )
    preferences = pl.read_parquet(lake / "models" / "preference" / DATASET / "preferences.parquet")
    selected = select_paths(
        pl.read_parquet(paths_dir / "paths.parquet"),
        preferences if row.variant == "lkg_rag" else None,
        selection,
    ).with_columns(variant=pl.lit(row.variant))
    tokenizer = AutoTokenizer.from_pretrained(base_model(lake))
    config = PromptConfig(format=row.format, max_prompt_tokens=PROMPT_TOKENS)
    titles = truncate_titles(
        dict(items.select("item_idx", "title").iter_rows()), tokenizer, config.max_title_tokens
    )
    train_prompts = build_prompts(
        examples,
        sequences,
        titles,
        selected if row.variant != "llamarec" else None,
        row.variant,
        config,
        lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
    )
    evaluated = pl.read_parquet(prompts_file(lake, row.variant, row.format)).filter(
        pl.col("split") != "train"
    )
    write_parquet_atomic(
        pl.concat([train_prompts, evaluated]), target, {INPUTS_KEY: json.dumps(made_from)}
    )
    return target


def uniform_prompt_sources(lake: Path, row: Row) -> dict[str, Path]:
    """The lake files the uniform rows' train prompts are made from (beside the code)."""
    return {
        "sequences": LakeFiles(lake).sequences,
        "items": LakeFiles(lake).items,
        "kg_triples": LakeFiles(lake).kg,
        "kg_paths_settings": lake / "paths" / "kg_paths" / DATASET / PATH_SETTINGS_FILE,
        "selected_paths": lake / "paths" / "selected_paths" / f"{DATASET}.parquet",
        "preferences": lake / "models" / "preference" / DATASET / "preferences.parquet",
        "evaluated_prompts": prompts_file(lake, row.variant, row.format),
    }


def prompts_file(lake: Path, variant: str, fmt: str) -> Path:
    """The quality run's own prompts of a variant in a format. Not the pipeline's: those are in
    whatever format `prompts` was last configured with (segments by default), and only for the
    variants it was materialised for."""
    return lake / "quality" / "prompts" / f"{variant}-{fmt}.parquet"


def base_model(lake: Path) -> Path:
    return (
        lake
        / "models"
        / "base_model"
        / json.loads((lake / "models" / "base_model" / "current.json").read_text())["folder"]
    )


def format_prompt_sources(lake: Path, variant: str) -> dict[str, Path]:
    """The lake files a variant's prompts are made from."""
    files = {
        "candidates": LakeFiles(lake).candidates,
        "sequences": LakeFiles(lake).sequences,
        "items": LakeFiles(lake).items,
    }
    if variant != "llamarec":
        files["selected_paths"] = lake / "paths" / "selected_paths" / f"{DATASET}.parquet"
    return files


def build_format_prompts(lake: Path, variant: str, fmt: str, max_prompt_tokens: int) -> Path:
    """A variant's prompts in a format, from the same inputs as the pipeline's `prompts`
    (candidates, sequences, titles, the preference-selected paths); cached, and rebuilt when
    one of those inputs changed."""
    target = prompts_file(lake, variant, fmt)
    sources = format_prompt_sources(lake, variant)
    made_from = {
        **digests(sources),
        "base_model": base_model(lake).name,
        "format": fmt,
        "max_prompt_tokens": max_prompt_tokens,
    }
    if built_from(target, made_from, sources.values()):
        return target
    from transformers import AutoTokenizer

    from lkg_pipeline.core.llm.prompts import PromptConfig, build_prompts, truncate_titles

    tokenizer = AutoTokenizer.from_pretrained(base_model(lake))
    config = PromptConfig(format=fmt, max_prompt_tokens=max_prompt_tokens)
    items = pl.read_parquet(LakeFiles(lake).items)
    titles = truncate_titles(
        dict(items.select("item_idx", "title").iter_rows()), tokenizer, config.max_title_tokens
    )
    selected = None
    if variant != "llamarec":
        selected = pl.read_parquet(lake / "paths" / "selected_paths" / f"{DATASET}.parquet")
    table = build_prompts(
        pl.read_parquet(LakeFiles(lake).candidates),
        pl.read_parquet(LakeFiles(lake).sequences),
        titles,
        selected,
        variant,
        config,
        lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
    )
    write_parquet_atomic(table, target, {INPUTS_KEY: json.dumps(made_from)})
    return target


def score_row(lake: Path, row: Row, adapter: Path | None, dtype: str = "auto") -> pl.DataFrame:
    """Rankings of every val/test prompt whose true item is a candidate, cached."""
    target = lake / "quality" / row.name / "rankings.parquet"
    if target.exists():
        return pl.read_parquet(target)
    from transformers import AutoTokenizer

    base = base_model(lake)
    choice, attention = choose_paths(base, dtype, "auto", "cpu")  # as `rankings` chooses
    prompts = pl.read_parquet(prompts_file(lake, row.variant, row.format)).filter(
        pl.col("split").is_in(["val", "test"]) & (pl.col("target_index") >= 0)
    )
    model = load_ranker(base, adapter, "cpu", choice.torch_dtype, attention.chosen)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tick = time.perf_counter()
    ranked = rank_prompts(model, tokenizer, prompts, retriever_prior=trained_over(adapter))
    print(
        f"{row.name}: {ranked.height} prompts in {time.perf_counter() - tick:.0f} s "
        f"({choice.describe()})",
        flush=True,
    )
    write_parquet_atomic(ranked, target)
    return ranked


# The every-layer recipe: LoRA on every linear layer in all 30 decoder layers, dropout 0.05,
# stopped after 40 of a 60-step schedule. `make bench-dtype` measures training speed with it,
# so that its ratios stay comparable from run to run, and the EXPERIMENTS below cite it.
EVERY_LAYER_RECIPE = TrainConfig(
    lora_r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    lr=5e-4,
    warmup_steps=6,
    epochs=1,
    batch_size=1,
    grad_accum=8,
    max_train_examples=480,
    max_steps=40,
    max_val_examples=100,
    eval_every=20,
    checkpoint_every=20,
    log_every=5,
    dtype="auto",
)


def shipped_recipe() -> TrainConfig:
    """`lora_adapter`'s defaults (what `make run` trains) at the larger budget of the full
    result (benchmarks/README.md#ranker-quality): 800 train prompts (100 optimizer steps of 8;
    25–29 min per variant in bf16 on 2 cores of an Intel Xeon with AMX) instead of 160,
    validated every 25 steps on 100 prompts, the adapter kept at its best validation NDCG@10.
    Only the budget differs from `make run`, so QUALITY.md measures the recipe users get."""
    from lkg_pipeline.defs.llm import LoraRunConfig

    return dataclasses.replace(
        LoraRunConfig().to_core(),
        max_train_examples=800,
        max_val_examples=100,
        eval_every=25,
        checkpoint_every=25,
        log_every=5,
    )


RECIPE = shipped_recipe()
# The residual rows: the same recipe with the LLM's scores trained as a correction on top of the
# retriever's (loss and validation over log-softmax(retriever) + LLM).
RESIDUAL_RECIPE = dataclasses.replace(RECIPE, retriever_prior=True)
# (variant, format, tuned[, over_retriever]) in the order they run: decisive comparisons first.
ROWS = (
    Row("lkg_rag", "segments", True),
    Row("llamarec", "segments", True),
    Row("kg_rag", "segments", True),
    Row("lkg_rag", "segments", False),
    Row("llamarec", "segments", False),
    Row("kg_rag", "segments", False),
    Row("lkg_rag", "letters", False),
    Row("llamarec", "letters", False),
    Row("kg_rag", "letters", False),
)
# Rows `--only` runs but `make quality` does not (yet): a lever is measured on validation first
# (`--only NAME --train-only`: the adapter and its validation curve, no test ranking) and joins
# ROWS when it beats the row it varies there.
EXPERIMENTS = (
    # Trained over the retriever (RESIDUAL_RECIPE). With the every-layer recipe (no dropout),
    # 320 prompts / 40 steps, it ties the retriever (test overall NDCG@10 0.0921, p = 1.0, AMD
    # EPYC): it learns to keep the retriever's order. Its held-out-scores version (`candidates`
    # train_scored_by: held_out, train_examples_per_user 2, train_retrieved_only, 688 train
    # prompts) stays below the retriever on validation (its builder is in commit bcc9fc9).
    Row("lkg_rag", "segments", True, over_retriever=True),
    # the reference's training candidates: the target and 19 uniform negatives. With the
    # every-layer recipe (`--only lkg_rag-segments-tuned_uniform --train-only`, step 20 of 40)
    # they are easier to fit than hard negatives but select worse: val NDCG@10 0.308, below
    # hard negatives (0.316–0.328) and the retriever (0.340) on the same 100 prompts.
    Row("lkg_rag", "segments", True, negatives="uniform"),
)
PROMPT_TOKENS = 2048  # as `prompts`' default: ~880 letters / ~1,030 segments tokens, none cut


def train_row(lake: Path, row: Row) -> Path:
    """The row's adapter, trained once (resumes an interrupted run) and kept in the lake."""
    output = lake / "quality" / row.name / "adapter"
    trained = trained_recipe(lake, row)
    if trained == recipe_record(row.recipe):
        return output
    if trained is not None:
        changed = {
            k: (trained.get(k), v)
            for k, v in recipe_record(row.recipe).items()
            if trained.get(k) != v
        }
        superseded(lake, row, f"adapter trained with another recipe {changed}")
        prepare_row(lake, row)  # the record of its prompts went with the old folder
    prompts = train_prompts_file(lake, row)
    training_function(row.recipe, RunPaths(prompts, base_model(lake), output))
    return output


def scored(lake: Path, row: Row) -> Path | None:
    """The row's cached rankings, if it was scored, and for a tuned row, trained with its
    recipe as it stands (the report leaves out rows of an earlier recipe)."""
    folder = lake / "quality" / row.name
    if not (folder / "rankings.parquet").exists():
        return None
    if row.tuned and trained_recipe(lake, row) != recipe_record(row.recipe):
        return None
    if not made_from_current_prompts(lake, row):
        return None
    return folder / "rankings.parquet"


def trained_recipe(lake: Path, row: Row) -> dict[str, Any] | None:
    """The recipe the row's cached adapter was trained with (None: no finished adapter)."""
    log = lake / "quality" / row.name / "adapter" / "training.json"
    return json.loads(log.read_text())["config"] if log.exists() else None


def recipe_record(recipe: TrainConfig) -> dict[str, Any]:
    """A TrainConfig as `training.json` records it (JSON: lists, not tuples)."""
    return json.loads(json.dumps(dataclasses.asdict(recipe)))


def superseded(lake: Path, row: Row, why: str) -> None:
    """Move a row's cache (its adapter, the rankings made with it) out of the way, kept under
    quality/superseded/, so that the row runs again."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    keep = lake / "quality" / "superseded" / f"{row.name}-{stamp}"
    keep.parent.mkdir(parents=True, exist_ok=True)
    (lake / "quality" / row.name).replace(keep)
    print(f"{row.name}: cache {why}; moved to {keep}", flush=True)


def run_row(lake: Path, row: Row) -> pl.DataFrame:
    prepare_row(lake, row)
    adapter = train_row(lake, row) if row.tuned else None
    return score_row(lake, row, adapter)


# ----------------------------------------------------------------------------- report

HEADLINE = ("MRR@1", "NDCG@10")
EVAL = EvaluationConfig()


def preference_ranks(lake: Path, candidates: pl.DataFrame) -> pl.DataFrame:
    """The preference module's own ranking of the val/test candidates (as the report does)."""
    from lkg_pipeline.core.paths.preference.model import load_preference
    from lkg_pipeline.core.paths.preference.ranking import example_ranks, score_examples

    folder = lake / "paths" / "kg_paths" / DATASET
    model = load_preference(lake / "models" / "preference" / DATASET)
    evaluated = candidates.filter(pl.col("split").is_in(["val", "test"]))
    scores = score_examples(
        model,
        evaluated,
        pl.read_parquet(folder / "pair_features.parquet"),
        pl.read_parquet(folder / "history_profile.parquet"),
    )
    return example_based_ranks(candidates, example_ranks(evaluated, scores), PREFERENCE)


# The learned rerankers' LLM feature and the KG-free reference of the rows that have no
# variant in their name (ltr, ltr+llm, served): the rows of the recipe `make run` serves.
LTR_LLM_ROW = Row("lkg_rag", "segments", True)
LLAMAREC_ROW = Row("llamarec", "segments", True)
SERVED = "served"


@dataclass
class AllRanks:
    ranks: pl.DataFrame  # per-user ranks of every row (RANK_COLUMNS)
    fusion: list[dict[str, Any]]  # how each +prior row's λ was chosen (on val)
    ltr: list[dict[str, Any]]  # each learned reranker's features, rounds and importances
    served: ServedChoice  # the ranker validation picks among the rows, as the pipeline does


def ltr_ranks(
    lake: Path, candidates: pl.DataFrame, llm_ranked: pl.DataFrame | None
) -> list[LtrRanker]:
    """`ltr` over the lake's KG path counts, popularity, recency and preference scores, and
    `ltr+llm` with `llm_ranked`'s scores as one more feature: the report's rerankers
    (core.evaluate.rankers), fitted on val (cross-fitted there), scored on test."""
    from lkg_pipeline.core.paths.preference.model import load_preference

    folder = lake / "paths" / "kg_paths" / DATASET
    files = LakeFiles(lake)
    evaluated = candidates.filter(pl.col("split").is_in(["val", "test"]))
    pairs = read_pair_features(folder, evaluated["example_id"])
    model = load_preference(lake / "models" / "preference" / DATASET)
    preference = preference_scores(model, evaluated, pairs, folder)
    by_variant = {} if llm_ranked is None else {LTR_LLM_ROW.variant: llm_ranked}
    return ltr_rankers(
        evaluated, pl.read_parquet(files.sequences), pl.read_parquet(files.items), pairs,
        preference, read_path_types(folder), by_variant,
    )  # fmt: skip


def all_ranks(lake: Path) -> AllRanks:
    """Per-user ranks of every cached row (and its +prior fusion), the retriever, the
    preference module, the learned rerankers and the served ranker, which is chosen among
    them by the pipeline's rule (core.evaluate.serving) on honest validation ranks."""
    candidates = pl.read_parquet(LakeFiles(lake).candidates)
    parts = [retriever_ranks(candidates), preference_ranks(lake, candidates)]
    honest_val, fusion = [], []
    llm_ranked = None
    for row in (*ROWS, *EXPERIMENTS):
        path = scored(lake, row)
        if path is None:
            continue
        ranked = pl.read_parquet(path)
        llm_ranked = ranked if row == LTR_LLM_ROW else llm_ranked
        parts.append(llm_ranks(candidates, ranked, row.name))
        fused, choice = fused_ranks(ranked, candidates)
        name = row.name + PRIOR_SUFFIX
        parts.append(example_based_ranks(candidates, fused, name))
        fusion.append(
            {"ranker": name, "lam": choice.lam, "calibrate": choice.calibrate,
             "choice": choice.describe()}
        )  # fmt: skip
        crossed = cross_fitted_val_ranks(ranked, candidates, seed=EVAL.seed)
        if crossed is not None:
            honest_val.append(example_based_ranks(candidates, crossed, name))
    ltr = []
    if learnable_val_examples(candidates) >= MIN_LTR_EXAMPLES:
        for reranker in ltr_ranks(lake, candidates, llm_ranked):
            # its val ranks are cross-fitted: honest as they are
            parts.append(example_based_ranks(candidates, reranker.ranks, reranker.name))
            llm_row = LTR_LLM_ROW.name if reranker.summary["llm_variant"] else None
            ltr.append({"ranker": reranker.name, **reranker.summary, "llm_variant": llm_row})
    ranks = pl.concat(parts)
    choosable = [n for n in dict.fromkeys(ranks["ranker"].to_list()) if n != PREFERENCE]
    # the fusions' val rows replaced by their cross-fitted ones, as the report chooses
    on_val = choice_ranks(parts, LlmRankers(honest_val=honest_val, fusion=fusion))
    served = choose_served(on_val, n_permutations=EVAL.n_permutations, seed=EVAL.seed,
                           servable=choosable)  # fmt: skip
    served_ranks = ranks.filter(pl.col("ranker") == served.served).with_columns(
        ranker=pl.lit(SERVED)
    )
    return AllRanks(pl.concat([ranks, served_ranks]), fusion, ltr, served)


def paired(ranks: pl.DataFrame, a: str, b: str, split: str, population: str) -> dict[str, Any]:
    """Mean difference and paired randomisation p-value of a vs b on the same users."""
    rows = ranks.filter(pl.col("split") == split)
    if population == "subset":
        rows = rows.filter(pl.col("in_candidates"))
    mine = rows.filter(pl.col("ranker") == a).select("user_idx", "rank")
    theirs = rows.filter(pl.col("ranker") == b).select("user_idx", base="rank")
    both = mine.join(theirs, on="user_idx").sort("user_idx")
    ks = EVAL.ks
    x = per_user_metrics(both["rank"].to_numpy(), ks)
    y = per_user_metrics(both["base"].to_numpy(), ks)
    xa = np.stack([x[m] for m in HEADLINE], axis=1)
    ya = np.stack([y[m] for m in HEADLINE], axis=1)
    p = paired_randomization_test(xa, ya, EVAL.n_permutations, np.random.default_rng(EVAL.seed))
    out: dict[str, Any] = {"ranker": a, "baseline": b, "users": both.height}
    for j, name in enumerate(HEADLINE):
        out[f"{name} diff"] = float(xa[:, j].mean() - ya[:, j].mean())
        out[f"{name} p"] = float(p[j])
    return out


def llamarec_of(name: str) -> str | None:
    """The row `name` is compared with to see what the KG adds: the same row without it; for
    the learned rerankers and the served ranker, the tuned `llamarec` of the served recipe."""
    if name in (LTR, LTR_LLM, SERVED):
        return LLAMAREC_ROW.name
    base = name.removesuffix(PRIOR_SUFFIX)
    if "-" not in base:
        return None
    variant, fmt, kind = base.split("-")
    reference = f"llamarec-{fmt}-{kind}{name[len(base) :]}"
    return None if reference == name else reference


def baselines_of(name: str) -> list[str]:
    """What a row is tested against: the retriever; the same row without the KG; its own
    zero-shot model (tuned rows); its own unfused scores (+prior rows); for `ltr+llm`, `ltr`
    (what the LLM's score adds to the explicit features) and the LLM row alone."""
    if name in (LTR, SERVED):
        return [RETRIEVER, LLAMAREC_ROW.name]
    if name == LTR_LLM:
        return [RETRIEVER, LLAMAREC_ROW.name, LTR, LTR_LLM_ROW.name]
    base = name.removesuffix(PRIOR_SUFFIX)
    suffix = name[len(base) :]
    variant, fmt, kind = base.split("-")
    out = [RETRIEVER]
    if variant != "llamarec":
        out.append(f"llamarec-{fmt}-{kind}{suffix}")
    if kind in ("tuned", "residual", "tuned_uniform"):
        out.append(f"{variant}-{fmt}-zero_shot{suffix}")
    if kind == "tuned_uniform":  # the same recipe on the retriever's hard negatives
        out.append(f"{variant}-{fmt}-tuned{suffix}")
    if kind == "residual":  # the same recipe trained without the retriever's scores
        out.append(f"{variant}-{fmt}-tuned{suffix}")
    if suffix:
        out.append(base)
    return out


def position_figure(lake: Path, path: Path) -> None:
    """Where the true item and each tuned row's top pick sit among the 20 (retriever order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = pl.read_parquet(LakeFiles(lake).candidates)
    test = candidates.filter((pl.col("split") == "test") & pl.col("in_candidates"))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    bins = np.arange(1, 22) - 0.5
    ax.hist(test["target_rank"].to_numpy(), bins=bins, histtype="step", lw=2, label="true item")
    for row in ROWS:
        file = scored(lake, row)
        if file is None:
            continue
        ranked = pl.read_parquet(file).filter(pl.col("split") == "test")
        joined = ranked.join(
            candidates.select("example_id", "candidate_item_idxs"), on="example_id"
        )
        picks = [
            c.index(r[0]) + 1
            for r, c in joined.select("ranked_item_idxs", "candidate_item_idxs").iter_rows()
        ]
        ax.hist(picks, bins=bins, histtype="step", label=f"top pick: {row.name}")
    ax.set_xlabel("position among the 20 candidates (retriever order, test subset)")
    ax.set_ylabel("prompts")
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def curve_figure(lake: Path, path: Path) -> list[dict[str, Any]]:
    """Training loss and validation NDCG@10 per step of each tuned row; the histories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    histories = []
    for row in ROWS:
        file = lake / "quality" / row.name / "adapter" / "training.json"
        if not row.tuned or scored(lake, row) is None:
            continue
        summary = json.loads(file.read_text())
        history = summary["history"]
        loss = [(h["step"], h["loss"]) for h in history if "loss" in h]
        val = [(h["step"], h["val"]["NDCG@10"]) for h in history if "val" in h]
        if loss:
            left.plot(*zip(*loss), label=row.name)
        right.plot(*zip(*val), marker="o", label=row.name)
        histories.append(
            {
                "row": row.name,
                "best_step": summary["best_step"],
                "val_ndcg10": val,
                "loss": loss,
                "tokens_per_s": summary["tokens_per_s"],
                "wall_time_s": summary["wall_time_s"],
                "n_train": summary["n_train"],
                "dtype": summary.get("precision", {}).get("dtype_chosen"),
            }
        )
    left.axhline(math.log(20), color="grey", ls=":", label="ln 20 (uniform)")
    left.set_title("train loss (CE over 20)")
    right.set_title(f"val NDCG@10 ({RECIPE.max_val_examples} prompts)")
    left.set_xlabel("optimizer step")
    right.set_xlabel("optimizer step")
    left.legend(fontsize=6)
    right.legend(fontsize=6)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return histories


def report(lake: Path) -> dict[str, Any]:
    """QUALITY.md, the two figures, and the `quality` section of results.json."""
    from lkg_pipeline.core.evaluate.compare import metrics_wide
    from lkg_pipeline.core.io.tables import markdown_table

    ranked = all_ranks(lake)
    ranks, fusion = ranked.ranks, ranked.fusion
    evaluation = evaluate(ranks, EVAL)
    names = list(dict.fromkeys(ranks["ranker"].to_list()))
    tests = []
    for name in names:
        if name in (RETRIEVER, PREFERENCE):
            continue
        for baseline in baselines_of(name):
            if baseline in names:
                for split in ("val", "test"):
                    tests.append(
                        {"split": split, **paired(ranks, name, baseline, split, "overall")}
                    )
    tests_table = pl.DataFrame(tests)
    overall = evaluation.metrics.filter(
        (pl.col("split") == "test") & (pl.col("population") == "overall")
    )
    value = {(r["ranker"], r["metric"]): r["value"] for r in overall.to_dicts()}

    def p_of(name: str, baseline: str, metric: str) -> float | None:
        hit = (
            tests_table.filter(
                (pl.col("ranker") == name)
                & (pl.col("baseline") == baseline)
                & (pl.col("split") == "test")
            )
            if tests_table.height
            else tests_table
        )
        return float(hit[f"{metric} p"][0]) if hit.height else None

    section: dict[str, Any] = {"machine": machine_info(), "dataset": DATASET, "rankers": {}}
    for name in names:
        reference = llamarec_of(name)
        section["rankers"][name] = {
            "test_overall": {m: value[(name, m)] for m in HEADLINE},
            "p_vs_retriever": {m: p_of(name, RETRIEVER, m) for m in HEADLINE},
            "p_vs_llamarec": {m: p_of(name, reference, m) for m in HEADLINE}
            if reference in names
            else None,
        }
    section["served"] = served_summary(ranked.served, evaluation.comparisons)
    section["fusion"] = fusion
    section["ltr"] = ranked.ltr
    section["recipe"] = {
        **dataclasses.asdict(RECIPE),
        "target_modules": list(RECIPE.target_modules),
    }
    section["residual_recipe_changes"] = {
        k: v for k, v in dataclasses.asdict(RESIDUAL_RECIPE).items() if v != getattr(RECIPE, k)
    }
    curve = HERE / "quality_curve.png"
    positions = HERE / "quality_positions.png"
    section["training"] = curve_figure(lake, curve)
    position_figure(lake, positions)

    lines = [
        "# Ranker quality on ml-100k (GroupLens ML-100K via RecBole, 943 users)",
        "",
        "Written by `make quality` (`python -m benchmarks.quality.rankers`). Every choice (the "
        "recipe, each `+prior` row's λ and calibration, the learned rerankers' boosting rounds, "
        "the served ranker) was made on validation; test was only scored.",
        "",
        f"Machine: {section['machine'].get('cpu_model')}, {section['machine'].get('nproc')} "
        f"cores, torch {section['machine'].get('torch')}; {section['machine'].get('date_utc')}.",
        "",
        "## Served ranker (the pipeline's rule, core.evaluate.serving, over these rows)",
        "",
        *served_lines(section["served"]),
        "## Verdicts (test, overall, paired randomisation test over users)",
        "",
    ]
    for name in names:
        if name in (RETRIEVER, PREFERENCE):
            continue
        for baseline in baselines_of(name):
            hit = tests_table.filter(
                (pl.col("ranker") == name)
                & (pl.col("baseline") == baseline)
                & (pl.col("split") == "test")
            )
            if not hit.height:
                continue
            r = hit.row(0, named=True)
            better = sum(r[f"{m} diff"] > 0 and r[f"{m} p"] < SIGNIFICANCE for m in HEADLINE)
            worse = sum(r[f"{m} diff"] < 0 and r[f"{m} p"] < SIGNIFICANCE for m in HEADLINE)
            if better == len(HEADLINE):
                word = "BEATS"
            elif worse:
                word = "is MIXED against" if better else "is WORSE than"
            else:
                word = "does NOT significantly beat"
            shown = ", ".join(
                f"{m} {r[f'{m} diff']:+.4f} (p = {r[f'{m} p']:.3g})" for m in HEADLINE
            )
            lines.append(f"- {name} {word} {baseline}: {shown}")
    for split in ("test", "val"):
        for population in ("overall", "subset"):
            n = evaluation.populations.filter(
                (pl.col("split") == split) & (pl.col("population") == population)
            )["n_users"][0]
            lines += ["", f"## {split}, {population} ({n} users; 95% bootstrap intervals)", ""]
            lines.append(markdown_table(metrics_wide(evaluation, split, population)))
    lines += ["", "## Paired tests (overall population; difference of means, p-value)", ""]
    lines.append(markdown_table(tests_table))
    lines += ["", "## Retriever prior (λ and calibration chosen on validation)", ""]
    lines += [f"- {f['ranker']}: {f['choice']}" for f in fusion]
    for reranker in ranked.ltr:
        importance = pl.DataFrame(reranker["importances"])
        lines += [
            "",
            f"## {reranker['ranker']}: what the learned reranker uses",
            "",
            f"LightGBM lambdarank from the retriever's score; boosting rounds per fold "
            f"{reranker['best_iterations']} (early-stopped on validation folds); LLM feature: "
            f"{reranker['llm_variant'] or 'none'}.",
            "",
            markdown_table(importance.with_columns(pl.selectors.float().round(4))),
        ]
    lines += ["", "## Training", ""]
    lines.append(
        "Recipe of every tuned row: "
        + ", ".join(
            f"{k}={v}"
            for k, v in section["recipe"].items()
            if k not in ("checkpoint_every", "log_every", "eval_batch_size")
        )
        + "; the residual rows change "
        + ", ".join(f"{k}={v}" for k, v in section["residual_recipe_changes"].items())
    )
    lines.append("")
    for h in section["training"]:
        lines.append(
            f"- {h['row']}: {h['n_train']} train prompts, best step {h['best_step']}, val "
            f"NDCG@10 by step {[(s, round(v, 4)) for s, v in h['val_ndcg10']]}, "
            f"{h['tokens_per_s']:.0f} train tokens/s in {h['dtype']}, "
            f"{h['wall_time_s'] / 60:.1f} min"
        )
    missing = [r.name for r in ROWS if scored(lake, r) is None]
    if missing:
        lines += ["", f"Not scored yet (run `make quality` to add them): {', '.join(missing)}."]
    lines += ["", "![training curves](quality_curve.png)", ""]
    lines += ["![positions](quality_positions.png)", ""]
    QUALITY_MD.write_text("\n".join(lines) + "\n")
    save_results_section(RESULTS_JSON, "quality", section)
    print(f"wrote {QUALITY_MD}")
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.rankers")
    parser.add_argument("--only", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--report", action="store_true", help="only re-render from the cache")
    parser.add_argument(
        "--train-only", action="store_true", help="train (and validate) tuned rows, rank nothing"
    )
    args = parser.parse_args(argv)
    lake = lake_root()
    torch.set_num_threads(2)
    wanted = [n for n in args.only.split(",") if n]
    known = (*ROWS, *EXPERIMENTS)
    rows = [r for r in known if r.name in wanted] if wanted else list(ROWS)
    unknown = set(wanted) - {r.name for r in known}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {[r.name for r in known]}")
    if args.train_only:
        for row in rows:
            if row.tuned:
                prepare_row(lake, row)
                done = json.loads((train_row(lake, row) / "training.json").read_text())
                curve = {
                    h["step"]: round(h["val"]["NDCG@10"], 4) for h in done["history"] if "val" in h
                }
                print(f"{row.name}: val NDCG@10 by step {curve}, kept step {done['best_step']}")
        return 0
    if not args.report:
        for row in rows:
            run_row(lake, row)
    report(lake)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
