"""The benchmarks' quick modes end to end: tiny random model, tiny synthetic graphs, seconds.

They prove every benchmark still runs against the product code it measures (a renamed
function or a changed table breaks them here, not at `make bench` time) and that each result
carries positive timings and its ratio; the numbers themselves mean nothing at this size.
"""

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import end_to_end, run
from benchmarks.harness import ceiling, machine_info, with_saved_sections
from benchmarks.llm import ranking, training
from benchmarks.paths import after_paths
from benchmarks.paths import bench as paths_bench
from benchmarks.retrieval import bench as retriever_bench
from benchmarks.retrieval import tune as tune_retriever

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LKG_TEST_CACHE", REPO / "data_lake" / "cache"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def plot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def paths_result(plot_dir: Path) -> dict[str, Any]:
    return paths_bench.run(quick=True, out_dir=plot_dir)


@pytest.fixture(scope="module")
def ranking_result() -> dict[str, Any]:
    return ranking.run(quick=True, cache_dir=CACHE)


@pytest.fixture(scope="module")
def training_result() -> dict[str, Any]:
    return training.run(quick=True, cache_dir=CACHE)


@pytest.fixture(scope="module")
def retriever_result() -> dict[str, Any]:
    return retriever_bench.run(quick=True)


def test_after_paths_quick(tiny_base: Path) -> None:
    """The stages after kg_paths, each in its own process, at two tiny sizes."""
    result = after_paths.run(quick=True, tokenizer=str(tiny_base))
    rows = result["rows"]
    assert {(r["users"], r["stage"]) for r in rows} == {
        (n, stage) for n in after_paths.QUICK_SIZES for stage in after_paths.STAGES
    }
    for row in rows:
        assert row["status"] == "ok", row
        assert row["seconds"] > 0 and row["stage_peak_rss_mb"] >= row["rss_before_mb"] > 0
    assert set(result["verdict"]) == set(after_paths.STAGES)
    markdown = after_paths.to_markdown(result)
    assert all(f"| {r['measured_at']}, {r['cpu_model']} | {r['stage']} |" in markdown for r in rows)
    smallest = min(after_paths.QUICK_SIZES)
    again = after_paths.run(
        quick=True, tokenizer=str(tiny_base), only_sizes=[smallest], only_stages=["selection"]
    )
    assert [(r["users"], r["stage"], r["status"]) for r in again["rows"]] == [
        (smallest, "selection", "ok")
    ]


def test_after_paths_reuses_a_kept_build(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--data` keeps a size's build and the next run measures on it without building."""
    smallest, kept = min(after_paths.QUICK_SIZES), tmp_path / "data"
    options = {"quick": True, "only_sizes": [smallest], "only_stages": ["preference"]}
    first = after_paths.run(**options, data=kept)
    built = kept / str(smallest) / after_paths.BUILT_FILE
    stamp = built.stat().st_mtime_ns
    assert "building the data" in capsys.readouterr().out
    again = after_paths.run(**options, data=kept)
    assert "reusing the data built" in capsys.readouterr().out
    assert built.stat().st_mtime_ns == stamp
    for row in (*first["rows"], *again["rows"]):
        assert (row["stage"], row["status"]) == ("preference", "ok"), row
    assert [r["paths_rows"] for r in first["rows"]] == [r["paths_rows"] for r in again["rows"]]
    assert after_paths._kept_build(kept / str(smallest), smallest + 1, True) is None


def test_paths_quick(paths_result: dict[str, Any], plot_dir: Path) -> None:
    c = paths_result["comparison"]
    assert c["ours_s"] > 0 and c["sample_pairs"] > 0
    assert c["networkx_all_paths_extrapolated_s"] > 0 and c["networkx_shortest_extrapolated_s"] > 0
    assert c["speedup_vs_all_paths"] > 0 and c["speedup_vs_shortest"] > 0
    assert c["same_paths_on_sample"], "networkx and enumerate_paths disagree on the sample"
    measured = [r for r in paths_result["scaling"] if r["status"] == "ok"]
    assert {r["shape"] for r in measured} == set(paths_bench.SHAPES)
    for row in measured:
        assert row["seconds"] > 0 and row["ms_per_user"] > 0
        assert row["peak_rss_mb"] >= row["rss_before_mb"] > 0
    assert (plot_dir / paths_bench.PLOT).stat().st_size > 0


def test_ranking_quick(ranking_result: dict[str, Any]) -> None:
    rows = ranking_result["policies"]
    assert [r["policy"] for r in rows] == list(ranking.POLICIES)
    for row in rows:
        assert row["seconds"] > 0 and row["prompts_per_s"] > 0 and row["speedup_vs_batch_1"] > 0
        assert row["share_of_matmul"] > 0
        # every policy must rank with the same scores, or its speed would mean nothing
        assert row["max_abs_score_diff_vs_batch_1"] < 1e-3


def test_training_quick(training_result: dict[str, Any]) -> None:
    rows = training_result["variants"]
    assert [r["variant"] for r in rows] == list(training.VARIANTS)
    for row in rows:
        assert row["status"] == "ok"
        assert row["seconds"] > 0 and row["tokens_per_s"] > 0 and row["speed_vs_letters"] > 0
        assert row["share_of_matmul"] > 0
    by_name = {r["variant"]: r for r in rows}
    # the reference's loss and ours (`loss: lm`) are the same objective, computed differently
    lm, reference = by_name["lm (ours, logits_to_keep=3)"], by_name[training.REFERENCE]
    assert lm["mean_loss"] == pytest.approx(reference["mean_loss"], rel=1e-4)


def test_retriever_quick(retriever_result: dict[str, Any]) -> None:
    rows = retriever_result["rows"]
    assert [r["size"] for r in rows] == [s.name for s in retriever_bench.QUICK_SIZES]
    for row in rows:
        assert row["status"] == "ok"
        assert row["train_steps"] > 0 and row["targets_per_s"] > 0 and row["epoch_s"] > 0
        assert row["ours_s"] > 0 and row["old_s"] > 0 and row["retrieval_speedup"] > 0
        # batch-wise retrieval must return what the whole matrix gives, or its speed is moot
        assert row["same_candidates"]
    small, large = rows
    assert large["old_score_matrix_gb"] == pytest.approx(100 * small["old_score_matrix_gb"])


def test_report_renders_every_section(
    paths_result: dict[str, Any],
    ranking_result: dict[str, Any],
    training_result: dict[str, Any],
    retriever_result: dict[str, Any],
) -> None:
    results = {
        "paths": paths_result,
        "ranking": ranking_result,
        "training": training_result,
        "retriever": retriever_result,
    }
    text = run.report(machine_info(), ceiling(True), results, dict.fromkeys(results, 1.0), True)
    for heading in (
        "## Machine",
        "## Headlines",
        "## Path enumeration",
        "## Ranking",
        "## LoRA",
        "## Retriever",
    ):
        assert heading in text
    assert "paths_scaling.png" in text
    assert "Earlier run" not in text


def test_only_keeps_the_other_benchmarks_from_the_earlier_run(
    tmp_path: Path, paths_result: dict[str, Any], training_result: dict[str, Any]
) -> None:
    earlier = machine_info() | {"date_utc": "2001-02-03 04:05 UTC"}
    saved = {
        "machine": earlier,
        "results": {"paths": paths_result, "training": training_result},
    }  # the layout before per-benchmark runs were recorded
    (tmp_path / "results.json").write_text(json.dumps(saved, default=str))
    assert run.main(["--quick", "--only", "retriever", "--output", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## Path enumeration", "## LoRA", "## Retriever"):
        assert heading in text
    assert text.count("*Earlier run: measured 2001-02-03 04:05 UTC") == 2
    retriever_section = text[text.index("## Retriever") :]
    assert "Earlier run" not in retriever_section
    stored = json.loads((tmp_path / "results.json").read_text())
    assert list(stored["results"]) == ["paths", "training", "retriever"]
    assert stored["runs"]["paths"]["machine"]["date_utc"] == "2001-02-03 04:05 UTC"
    assert stored["runs"]["retriever"]["machine"]["date_utc"] != "2001-02-03 04:05 UTC"
    assert not list(tmp_path.glob(".*.partial"))


def test_a_full_run_keeps_the_sections_other_commands_wrote(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    other = {"planted": {"doses": [1.0, 0.3]}, "retriever_tuning": {"trials": 3}}
    results.write_text(json.dumps({"machine": {"old": True}, "results": {"paths": {}}, **other}))
    mine = {"machine": {"new": True}, "matmul": {}, "results": {"retriever": {}}, "runs": {}}
    merged = with_saved_sections(results, mine)
    assert {k: merged[k] for k in other} == other  # kept whatever command wrote them
    assert {k: merged[k] for k in mine} == mine  # this run's own sections replace the old
    assert with_saved_sections(tmp_path / "absent.json", mine) == mine


def test_full_run_without_a_data_lake_names_make_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LKG_DATA_LAKE", str(tmp_path / "empty_lake"))
    assert run.main(["--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "make run" in error and "kg_triples" in error
    assert not (tmp_path / "out").exists()


def test_end_to_end_quick_runs_make_run_twice_and_reuses_the_expensive_stages(
    recbole_wheel: Path,
) -> None:
    """The README's main command (`make run`, 20 users, tiny model), cold then unchanged."""
    result = end_to_end.measure(quick=True, interval=0.5, keep=None, wheel_dir=recbole_wheel.parent)
    cold, warm = result["runs"]["cold"], result["runs"]["nothing changed"]
    for run_ in (cold, warm):
        assert run_["wall_s"] > 0 and run_["peak_rss_mb"] > 0
        assert all(step["seconds"] >= 0 for step in run_["steps"])
    assert not [a for step in cold["steps"] for a in step["reused"]]
    reused = {a for step in warm["steps"] for a in step["reused"]}
    assert reused == {"retriever", "lora_adapter", "rankings", "recommendations"}
    # Every asset of the graph was materialised in both runs (reused ones included).
    assets = [{a for step in r["steps"] for a in step["assets"]} for r in (cold, warm)]
    assert assets[0] == assets[1] and {"kg_triples", "evaluation_report"} <= assets[0]
    text = end_to_end.to_markdown(result)
    assert "| yes |" in text and "recomputed" in text


def test_sampled_softmax_quick() -> None:
    from benchmarks.retrieval import sampled_softmax

    result = sampled_softmax.run(quick=True)
    full, sampled = result["quality"][0], result["quality"][1]
    assert full["loss"] == "full softmax" and sampled["loss"].startswith("sampled")
    assert 0 < full["val_Recall@10"] <= 1 and sampled["recall_vs_full"] > 0
    (step,) = result["step_time"]
    assert step["full_s_per_step"] > 0 and step["sampled_s_per_step"] > 0
    users = result["data"]["users"]
    assert f"{users:,} users" in sampled_softmax.to_markdown(result)


def test_dtype_ablation_quick(tiny_base: Path, tmp_path: Path) -> None:
    """`make bench-dtype`'s side-by-side ablation runs every configuration on real code paths
    (tiny model, a random adapter, segments prompts) and reports a median for each."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.llm.dtype import ablation
    from lkg_pipeline.core.llm.train.config import lora_config
    from lkg_pipeline_tests.core.llm.test_segments import marked_prompts, marked_training

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    get_peft_model(model, lora_config(marked_training())).save_pretrained(tmp_path / "adapter")
    prompts = marked_prompts(n_train=0, n_val=3)
    out = ablation(
        tiny_base, tmp_path / "adapter", prompts, AutoTokenizer.from_pretrained(tiny_base)
    )
    assert out["prompts"] == 2
    assert len(out["ranking_s_per_prompt"]) == 8 and len(out["training_s_per_prompt"]) == 7
    seconds = [*out["ranking_s_per_prompt"].values(), *out["training_s_per_prompt"].values()]
    assert all(s > 0 for s in seconds)


def test_frozen_probe_states_and_heads(tiny_base: Path, tmp_path: Path) -> None:
    """The frozen-probe benchmark reads one state per candidate and depth through the ranker's
    own model and attention, caches them resumably, and a head trained on them learns a task
    the segments reveal (the marked title) far above chance on held-out prompts."""
    import numpy as np
    import polars as pl
    import torch
    from transformers import AutoTokenizer

    from benchmarks.llm.frozen_probe import DEPTHS, extract, load, per_user, train_head
    from lkg_pipeline.core.llm.rank.scoring import load_ranker
    from lkg_pipeline_tests.core.llm.test_segments import marked_prompts

    prompts = marked_prompts(n_train=160, n_val=40)
    prompts = prompts.with_columns(
        split=pl.when(pl.col("example_id") >= 180).then(pl.lit("test")).otherwise("split"),
        retriever_scores=pl.Series([[float(-c) for c in range(20)]] * prompts.height),
    )
    model = load_ranker(tiny_base, None, "cpu", torch.float32)
    extract(model, AutoTokenizer.from_pretrained(tiny_base), prompts, tmp_path)
    states, targets, prior = load(tmp_path, "train")
    assert states.shape == (160, 20, len(DEPTHS), model.config.hidden_size)
    assert targets.tolist() == prompts.filter(pl.col("split") == "train")["target_index"].to_list()
    assert np.allclose(np.exp(prior).sum(axis=1), 1.0)
    cached = {f.name: f.stat().st_mtime_ns for f in tmp_path.glob("*.npz")}
    extract(model, AutoTokenizer.from_pretrained(tiny_base), prompts, tmp_path)  # resumes
    assert {f.name: f.stat().st_mtime_ns for f in tmp_path.glob("*.npz")} == cached
    head = train_head(states, targets, prior, [2], 0, 30, False, seed=0)
    val_states, val_targets, _ = load(tmp_path, "val")
    mrr1 = per_user(head(val_states), val_targets)[:, 1].mean()
    assert mrr1 > 0.5, f"the probe found the marked candidate in only {mrr1:.0%} of val prompts"


def test_lora_layers_trains_each_setting_and_validates_it(tiny_base: Path, tmp_path: Path) -> None:
    from benchmarks.llm.lora_layers import measure
    from lkg_pipeline_tests.core.llm.test_train_lora import synthetic_prompts

    prompts = tmp_path / "prompts.parquet"
    synthetic_prompts().write_parquet(prompts)
    rows = measure(prompts, tiny_base, [1, None], n_val=4)
    assert [r["lora_layers"] for r in rows] == [1, "all"]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert set(row["val_final"]) >= {"NDCG@10", "MRR@1"}
        assert row["val_step0"] == rows[0]["val_step0"]  # the same untrained model, same prompts


def test_save_results_section_replaces_one_section_and_keeps_the_others(tmp_path: Path) -> None:
    from benchmarks.harness import save_results_section

    results = tmp_path / "results.json"
    save_results_section(results, "a", {"x": 1})
    save_results_section(results, "b", {"when": Path("p")})  # not JSON: written as its str
    save_results_section(results, "a", {"x": 2})
    assert json.loads(results.read_text()) == {"a": {"x": 2}, "b": {"when": "p"}}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_quality_recipe_is_lora_adapters_at_a_larger_budget() -> None:
    """`make quality` measures what `make run` ships: only the budget fields differ."""
    import dataclasses

    from benchmarks.quality.rankers import RECIPE, RESIDUAL_RECIPE
    from lkg_pipeline.defs.llm import LoraRunConfig

    shipped = dataclasses.asdict(LoraRunConfig().to_core())
    differ = {k for k, v in dataclasses.asdict(RECIPE).items() if shipped[k] != v}
    assert differ == {
        "max_train_examples", "max_val_examples", "eval_every", "checkpoint_every", "log_every",
    }  # fmt: skip
    assert RECIPE.max_train_examples > shipped["max_train_examples"]
    assert RESIDUAL_RECIPE.retriever_prior and not RECIPE.retriever_prior


def test_quality_cache_of_another_recipe_is_set_aside(tmp_path: Path) -> None:
    """A tuned row cached under an earlier recipe is not reported, and is moved (not deleted)
    out of the cache so that `make quality` trains it again; a current one is kept."""
    import dataclasses

    import polars as pl

    from benchmarks.quality.rankers import ROWS, recipe_record, scored, superseded

    tuned = next(r for r in ROWS if r.tuned)
    zero_shot = next(r for r in ROWS if not r.tuned)
    for row in (tuned, zero_shot):
        (tmp_path / "quality" / row.name / "adapter").mkdir(parents=True)
        pl.DataFrame({"example_id": [1]}).write_parquet(
            tmp_path / "quality" / row.name / "rankings.parquet"
        )
    log = tmp_path / "quality" / tuned.name / "adapter" / "training.json"
    log.write_text(json.dumps({"config": recipe_record(tuned.recipe)}))
    assert scored(tmp_path, tuned) is not None and scored(tmp_path, zero_shot) is not None

    older = recipe_record(dataclasses.replace(tuned.recipe, lora_layers=None))
    log.write_text(json.dumps({"config": older}))
    assert scored(tmp_path, tuned) is None
    superseded(tmp_path, tuned, "trained with another recipe")
    assert not (tmp_path / "quality" / tuned.name).exists()
    (kept,) = (tmp_path / "quality" / "superseded").iterdir()
    assert kept.name.startswith(tuned.name + "-")
    assert json.loads((kept / "adapter" / "training.json").read_text())["config"] == older
    assert (kept / "rankings.parquet").exists()


def test_quality_prompts_and_rows_follow_the_lake_they_were_made_from(tmp_path: Path) -> None:
    """A quality prompts file is current while the lake files it was made from are unchanged;
    a row made from other prompts is left out of the report and set aside by the next run;
    a file from before records were kept is judged by modification times."""
    import polars as pl

    from benchmarks.quality.rankers import (
        INPUTS_KEY,
        PROMPT_TOKENS,
        ROW_INPUTS,
        ROWS,
        base_model,
        built_from,
        digests,
        format_prompt_sources,
        made_from_current_prompts,
        prepare_row,
        prompts_file,
        scored,
    )

    row = next(r for r in ROWS if r.variant == "lkg_rag" and not r.tuned)
    (tmp_path / "models" / "base_model" / "SmolLM2-x").mkdir(parents=True)
    (tmp_path / "models" / "base_model" / "current.json").write_text('{"folder": "SmolLM2-x"}')
    sources = format_prompt_sources(tmp_path, row.variant)
    assert "selected_paths" in sources and "selected_paths" not in format_prompt_sources(
        tmp_path, "llamarec"
    )
    for name, path in sources.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({name: [1, 2]}).write_parquet(path)

    def made_from() -> dict[str, Any]:
        return {
            **digests(sources),
            "base_model": base_model(tmp_path).name,
            "format": row.format,
            "max_prompt_tokens": PROMPT_TOKENS,
        }

    prompts = prompts_file(tmp_path, row.variant, row.format)
    prompts.parent.mkdir(parents=True)
    pl.DataFrame({"example_id": [1]}).write_parquet(
        prompts, metadata={INPUTS_KEY: json.dumps(made_from())}
    )
    assert built_from(prompts, made_from(), sources.values())
    pl.DataFrame({"candidates": [2, 1]}).write_parquet(sources["candidates"])
    assert not built_from(prompts, made_from(), sources.values())

    # a row folder made from the prompts as they are, then the prompts rebuilt
    pl.DataFrame({"example_id": [1]}).write_parquet(
        prompts, metadata={INPUTS_KEY: json.dumps(made_from())}
    )
    prepare_row(tmp_path, row)  # finds the prompts current: nothing rebuilt
    folder = tmp_path / "quality" / row.name
    pl.DataFrame({"example_id": [1]}).write_parquet(folder / "rankings.parquet")
    assert made_from_current_prompts(tmp_path, row) and scored(tmp_path, row) is not None
    pl.DataFrame({"example_id": [2]}).write_parquet(
        prompts, metadata={INPUTS_KEY: json.dumps(made_from())}
    )
    assert not made_from_current_prompts(tmp_path, row) and scored(tmp_path, row) is None
    prepare_row(tmp_path, row)
    (kept,) = (tmp_path / "quality" / "superseded").iterdir()
    assert (kept / "rankings.parquet").exists() and not (folder / "rankings.parquet").exists()
    assert made_from_current_prompts(tmp_path, row)  # the new record: today's prompts

    # from before records: current unless the prompts are newer than what was made from them
    (folder / ROW_INPUTS).unlink()
    pl.DataFrame({"example_id": [1]}).write_parquet(folder / "rankings.parquet")
    made = (folder / "rankings.parquet").stat().st_mtime
    os.utime(prompts, (made - 60, made - 60))
    assert made_from_current_prompts(tmp_path, row)
    os.utime(prompts, (made + 60, made + 60))
    assert not made_from_current_prompts(tmp_path, row)
    legacy = tmp_path / "legacy.parquet"
    pl.DataFrame({"example_id": [1]}).write_parquet(legacy)
    os.utime(legacy, (made + 120, made + 120))
    assert built_from(legacy, made_from(), sources.values())
    os.utime(sources["items"], (made + 180, made + 180))
    assert not built_from(legacy, made_from(), sources.values())


def test_tune_retriever_quick_writes_its_table_and_resumes(tmp_path: Path) -> None:
    tune_retriever.main(["--quick", "--out", str(tmp_path)])
    log = (tmp_path / "trials.jsonl").read_text().splitlines()
    table = (tmp_path / "TUNING.md").read_text()
    assert len(log) == 2 and "**Best on validation:" in table
    names = [json.loads(line)["name"] for line in log]
    assert all(f"| {name} |" in table for name in names)
    assert all(len(json.loads(line)["val_ranks"]) == 40 for line in log)  # one rank per user
    tune_retriever.main(["--quick", "--out", str(tmp_path)])  # done trials are not run again
    assert (tmp_path / "trials.jsonl").read_text().splitlines() == log


def test_fractions_of_ceiling_count_the_linear_layers_by_hand() -> None:
    """SmolLM2-135M's decoder: per layer q, o 576×576, k, v 576×192, gate, up, down 576×1536."""
    from types import SimpleNamespace

    from benchmarks.llm import dtype

    smol = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                           num_key_value_heads=3, num_hidden_layers=30)  # fmt: skip
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert dtype.linear_weights_per_layer(smol) == per_layer == 3_538_944
    assert dtype.gflop_per_token(smol) == pytest.approx(2 * 30 * per_layer / 1e9)
    # the backward through the 10 LoRA layers only: a third more than the forward's 30
    assert dtype.gflop_per_token(smol, 10) == pytest.approx(2 * 40 * per_layer / 1e9)
    section = {
        "ceilings": {"a": {"float32_gflops": 100.0, "bfloat16_gflops": 300.0},
                     "b": {"float32_gflops": 200.0, "bfloat16_gflops": 400.0}},
        "float32": {"ranking_tokens_per_s": 500.0, "training_tokens_per_s": 100.0},
        "bfloat16": {"ranking_tokens_per_s": 1000.0},
    }  # fmt: skip
    out = dtype.fractions_of_ceiling(section, smol, {"training_tokens_per_s": 10})
    forward = 2 * 30 * per_layer / 1e9
    assert out["ranking_fraction_of_ceiling"] == {
        "float32": round(500 * forward / 200, 3), "bfloat16": round(1000 * forward / 400, 3)
    }  # fmt: skip
    assert out["training_fraction_of_ceiling"] == {
        "float32": round(100 * forward * 4 / 3 / 200, 3), "bfloat16": None
    }  # fmt: skip


def test_levers_measure_each_lever_on_real_code_paths(tiny_base: Path, tmp_path: Path) -> None:
    """`make bench-levers` profiles, compiles and quantizes the ranker on real code paths (tiny
    model, a random adapter, segments prompts): every configuration is timed and scored, and
    the profile's op families hold the whole forward."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.llm.levers import INT8_ROUNDINGS, measure
    from lkg_pipeline.core.llm.train.config import lora_config
    from lkg_pipeline_tests.core.llm.test_segments import marked_prompts, marked_training

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    attention_only = marked_training(target_modules=("q_proj", "v_proj"))  # as the pipeline's
    get_peft_model(model, lora_config(attention_only)).save_pretrained(tmp_path / "adapter")
    prompts = marked_prompts(n_train=0, n_val=3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    out = measure(tiny_base, tmp_path / "adapter", prompts, tokenizer, quick=True)
    configs = {"fp32", "bf16 (now)", "int8, all but down_proj", "int8, every linear"}
    configs.add("bf16 + compiled MLPs")
    assert set(out["s_per_prompt"]) == set(out["quality"]) == configs
    assert all(s > 0 for s in out["s_per_prompt"].values())
    assert out["quality"]["fp32"]["top1_agreement"] == 1.0
    assert out["quality"]["fp32"]["rank_correlation"] == pytest.approx(1.0)
    assert set(out["int8_rounding"]) == set(INT8_ROUNDINGS)
    assert out["int8_weight_only_gemm"]["int8_weights_ms"] > 0
    assert sum(out["profile_bf16"]["share"].values()) == pytest.approx(1.0, abs=0.01)
    assert out["profile_bf16"]["ms_per_prompt"]["linear_gemms"] > 0
    assert out["compile"]["buckets"] >= 1 and out["compile"]["compile_s"] > 0
    micro = out["compile_mlp_micro"]
    assert set(micro["compile_s"]) == {"compiled", "compiled, frozen weights"}
    assert all(ms > 0 for ms in micro["ms"].values())


def test_compiled_mlps_pad_rows_to_a_bucket_and_return_the_eager_values(tiny_base: Path) -> None:
    """The compiled MLP pads a call's rows to a whole bucket and cuts the padding off again:
    for a row count that is no multiple of the bucket it gives what the eager MLP gives."""
    from transformers import AutoModelForCausalLM

    from benchmarks.llm.levers import compile_mlps

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 37, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = mlp(x)
        warm = compile_mlps(model, bucket=16)
        assert warm(37) > 0
        compiled = mlp(x)
    assert compiled.shape == eager.shape == (1, 37, model.config.hidden_size)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_agreement_and_fake_int8_on_hand_made_scores() -> None:
    from benchmarks.llm.levers import agreement, fake_int8

    reference = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert agreement(reference * 2 + 1, reference) == {
        "top1_agreement": 1.0,
        "rank_correlation": 1.0,
    }
    reversed_first = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert agreement(reversed_first, reference) == {"top1_agreement": 0.5, "rank_correlation": 0.0}
    x = torch.tensor([[127.0, 0.4, -63.6], [1.0, 0.5, 0.26]])
    torch.testing.assert_close(
        fake_int8(x, dim=1), torch.tensor([[127.0, 0.0, -64.0], [1.0, 0.5039370, 0.2598425]])
    )


def test_op_families_sort_profiler_ops_into_gemms_attention_softmax_and_the_rest() -> None:
    from benchmarks.llm.levers import op_families

    families = op_families(
        {"aten::mm": 5.0, "aten::bmm": 2.0, "aten::_softmax": 1.0, "aten::mul": 0.5, "x": 0.25}
    )
    assert families == {
        "linear_gemms": 5.0,
        "attention_products": 2.0,
        "softmax": 1.0,
        "other": 0.75,
    }
