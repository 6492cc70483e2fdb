"""`make tune-retriever`: the retriever's settings searched on validation, every trial kept.

Each trial trains one retriever (`core.retrieval.training.train_retriever`, the asset's own
code) on the lake's ml-100k `sequences` with the defaults plus the trial's overrides, and records
its validation and test metrics and each user's val/test rank. Trials are chosen and the best is
picked on **validation NDCG@10 only**; the test columns are written so that a reader can see
whether the choice holds, never used to choose. The best trial is compared with the first (the
previous defaults) by the paired sign-flip test the evaluation report uses, on val and test.

Trials run one after another (two torch processes on 2 cores slow each other) and each is
appended to `data_lake/tuning/retriever_<dataset>.jsonl` as it finishes, so an interrupted
search resumes where it stopped. Output: `benchmarks/retrieval/RETRIEVER_TUNING.md` and results.json
section `retriever_tuning`.

    python -m benchmarks.retrieval.tune                 # every trial in TRIALS
    python -m benchmarks.retrieval.tune --only sasrec   # trials whose name contains "sasrec"
    python -m benchmarks.retrieval.tune --report        # re-render from the trials run so far
    python -m benchmarks.retrieval.tune --quick         # tiny synthetic data, a temp folder
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from benchmarks.harness import (
    DATASET,
    RESULTS_JSON,
    cpu_flags_shown,
    lake_root,
    machine_info,
    require_lake,
    save_results_section,
    table,
)
from lkg_pipeline.core.evaluate.compare import paired_randomization_test
from lkg_pipeline.core.evaluate.metrics import per_user_metrics
from lkg_pipeline.core.retrieval.ranking import rank_users
from lkg_pipeline.core.retrieval.seqrec import RetrieverConfig
from lkg_pipeline.core.retrieval.sequences import UserSequences, user_sequences
from lkg_pipeline.core.retrieval.training import train_retriever

HERE = Path(__file__).resolve().parent  # the topic folder: its pages and figures
MARKDOWN = HERE / "RETRIEVER_TUNING.md"
SELECT_ON = "NDCG@10"  # validation metric that picks the best trial
SHOWN = ("NDCG@10", "Recall@10", "MRR@10", "Recall@20")

# name -> overrides of RetrieverConfig's defaults. The first is the reference every p-value is
# against. One factor at a time from the defaults, then combinations of the factors that
# helped on validation (the later rows were added after reading the earlier ones).
TRIALS: dict[str, dict[str, Any]] = {
    "lrurec (old defaults)": {},
    "lrurec select NDCG@10": {"selection_metric": "NDCG@10"},
    "lrurec patience 30": {"patience": 30},
    "lrurec dropout 0.1": {"dropout": 0.1},
    "lrurec dropout 0.4": {"dropout": 0.4},
    "lrurec lr 2e-3": {"lr": 2e-3},
    "lrurec weight_decay 0.1": {"weight_decay": 0.1},
    "lrurec max_len 50": {"max_len": 50},
    "lrurec sliding_step 50": {"sliding_step": 50},
    "lrurec d_model 128": {"d_model": 128},
    "sasrec": {"architecture": "sasrec"},
    "sasrec max_len 50": {"architecture": "sasrec", "max_len": 50},
    "sasrec dropout 0.4": {"architecture": "sasrec", "dropout": 0.4},
    "sasrec max_len 50, dropout 0.4": {"architecture": "sasrec", "max_len": 50, "dropout": 0.4},
    "sasrec max_len 50, select NDCG@10": {
        "architecture": "sasrec",
        "max_len": 50,
        "selection_metric": "NDCG@10",
    },
    # Windows every 10 items: each target is also trained with up to 50 items before it (as
    # at scoring time), not only with what precedes it inside one non-overlapping window.
    "sasrec max_len 50, sliding_step 10": {
        "architecture": "sasrec",
        "max_len": 50,
        "sliding_step": 10,
    },
    "sasrec max_len 30": {"architecture": "sasrec", "max_len": 30},
    "lrurec max_len 50, dropout 0.4": {"max_len": 50, "dropout": 0.4},
    "lrurec max_len 50, sliding_step 10": {"max_len": 50, "sliding_step": 10},
    "lrurec max_len 30": {"max_len": 30},
    "lrurec batch_size 16": {"batch_size": 16},
    "lrurec max_len 50, dropout 0.4, select NDCG@10": {
        "max_len": 50,
        "dropout": 0.4,
        "selection_metric": "NDCG@10",
    },
}


@dataclasses.dataclass(frozen=True)
class Trial:
    name: str
    overrides: dict[str, Any]
    config: dict[str, Any]
    best_epoch: int
    epochs_run: int
    wall_s: float
    val: dict[str, float]
    test: dict[str, float]
    val_ranks: list[int]
    test_ranks: list[int]


def run_trial(name: str, overrides: dict[str, Any], data: UserSequences) -> Trial:
    config = RetrieverConfig(n_items=data.n_items, **overrides)
    started = time.perf_counter()
    result = train_retriever(data, config)
    ranks = {}
    for split in ("val", "test"):
        inputs, targets = data.inputs(split)
        ranks[split] = rank_users(result.model, inputs, 0, targets).target_ranks
    return Trial(
        name=name,
        overrides=overrides,
        config=dataclasses.asdict(config),
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        wall_s=round(time.perf_counter() - started, 1),
        val=_metrics(ranks["val"]),
        test=_metrics(ranks["test"]),
        val_ranks=ranks["val"].tolist(),
        test_ranks=ranks["test"].tolist(),
    )


def _metrics(ranks: np.ndarray) -> dict[str, float]:
    return {m: float(v.mean()) for m, v in per_user_metrics(ranks, (10, 20)).items()}


def load_trials(log: Path) -> dict[str, Trial]:
    if not log.exists():
        return {}
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {row["name"]: Trial(**row) for row in rows}


def append_trial(log: Path, trial: Trial) -> None:
    """One JSON line per finished trial: a killed search loses at most the running trial."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(json.dumps(dataclasses.asdict(trial)) + "\n")


def _paired(first: Trial, second: Trial, seed: int) -> dict[str, float]:
    """Difference in SELECT_ON (first − second) and its paired sign-flip p, val and test."""
    out = {}
    for split in ("val", "test"):
        a = per_user_metrics(np.asarray(getattr(first, f"{split}_ranks")), (10,))[SELECT_ON]
        b = per_user_metrics(np.asarray(getattr(second, f"{split}_ranks")), (10,))[SELECT_ON]
        rng = np.random.default_rng(seed)
        p = paired_randomization_test(a[:, None], b[:, None], 10_000, rng)[0]
        out[f"{split}_delta"] = float(a.mean() - b.mean())
        out[f"{split}_p"] = float(p)
    return out


def summarise(trials: dict[str, Trial], reference: str, seed: int = 0) -> dict[str, Any]:
    """Best trial on validation, its paired p against `reference`, and each family's best
    against the other family's best, on val and on test."""
    best = max(trials.values(), key=lambda t: t.val[SELECT_ON])
    out: dict[str, Any] = {"best": best.name, "reference": reference, "select_on": SELECT_ON}
    out |= _paired(best, trials[reference], seed)
    families: dict[str, Trial] = {}
    for t in trials.values():
        family = t.config["architecture"]
        if family not in families or t.val[SELECT_ON] > families[family].val[SELECT_ON]:
            families[family] = t
    out["family_best"] = {family: t.name for family, t in families.items()}
    others = [t for f, t in families.items() if t.name != best.name]
    if others:
        out["runner_up_family"] = {"name": others[0].name, **_paired(best, others[0], seed)}
    return out


def to_markdown(trials: dict[str, Trial], summary: dict[str, Any], machine: dict) -> str:
    rows = []
    for t in sorted(trials.values(), key=lambda t: -t.val[SELECT_ON]):
        row = {"trial": t.name, "overrides": json.dumps(t.overrides) if t.overrides else "-"}
        row |= {f"val {m}": f"{t.val[m]:.4f}" for m in SHOWN}
        row |= {f"test {m}": f"{t.test[m]:.4f}" for m in SHOWN}
        row |= {"best epoch": t.best_epoch, "epochs": t.epochs_run, "seconds": t.wall_s}
        rows.append(row)
    s = summary
    return "\n".join(
        [
            "# Retriever search on validation (`make tune-retriever`)",
            "",
            f"Dataset {DATASET}; machine: {machine.get('cpu_model', '?')}, "
            f"{machine.get('nproc', '?')} cores, flags {cpu_flags_shown()}. Trials sorted by "
            f"validation {SELECT_ON}, which alone picks the best; test columns are for reading, "
            "not choosing. `seconds` is each trial's wall time; other jobs shared the machine "
            "during parts of the search, so compare them loosely.",
            "",
            f"**Best on validation: {s['best']}.** Against {s['reference']}: val "
            f"{SELECT_ON} {s['val_delta']:+.4f} (paired p = {s['val_p']:.3g}), test "
            f"{s['test_delta']:+.4f} (p = {s['test_p']:.3g}).",
            *(
                [
                    f"Against the other family's best ({s['runner_up_family']['name']}): val "
                    f"{s['runner_up_family']['val_delta']:+.4f} (p = "
                    f"{s['runner_up_family']['val_p']:.3g}), test "
                    f"{s['runner_up_family']['test_delta']:+.4f} (p = "
                    f"{s['runner_up_family']['test_p']:.3g})."
                ]
                if "runner_up_family" in s
                else []
            ),
            "",
            table(rows),
            "",
        ]
    )


def synthetic_sequences(users: int = 40, items: int = 30, length: int = 12) -> pl.DataFrame:
    """Users walking a cycle from random starts: learnable in a few epochs."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(users):
        start = int(rng.integers(items))
        for pos in range(length):
            split = "test" if pos == length - 1 else "val" if pos == length - 2 else "train"
            rows.append((u, (start + pos) % items, pos, split))
    return pl.DataFrame(rows, schema=["user_idx", "item_idx", "position", "split"], orient="row")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run trials whose name contains this")
    parser.add_argument("--quick", action="store_true", help="tiny synthetic data, temp folder")
    parser.add_argument("--out", type=Path, help="--quick's folder (default: a new temp one)")
    parser.add_argument("--report", action="store_true", help="only re-render from the log")
    args = parser.parse_args(argv)
    trials_wanted = {k: v for k, v in TRIALS.items() if args.only in k and not args.report}
    if args.quick:
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="tune_retriever_"))
        data = user_sequences(synthetic_sequences())
        trials_wanted = {
            name: {**o, "max_len": 8, "d_model": 16, "max_epochs": 3}
            for name, o in list(trials_wanted.items())[:2]
        }
        log, markdown, results = out_dir / "trials.jsonl", out_dir / "TUNING.md", None
    else:
        lake = require_lake("sequences")
        data = user_sequences(pl.read_parquet(lake.sequences))
        log = lake_root() / "tuning" / f"retriever_{DATASET}.jsonl"
        markdown, results = MARKDOWN, RESULTS_JSON
    done = load_trials(log)
    for name, overrides in trials_wanted.items():
        if name in done and done[name].overrides == overrides:
            continue
        trial = run_trial(name, overrides, data)
        append_trial(log, trial)
        done[name] = trial
        print(f"{name}: val {SELECT_ON} {trial.val[SELECT_ON]:.4f} ({trial.wall_s:.0f} s)")
    reference = next(iter(trials_wanted if args.quick else TRIALS))  # the old defaults
    done = {k: v for k, v in done.items() if k in trials_wanted or k in TRIALS}
    summary = summarise(done, reference)
    machine = machine_info()
    markdown.write_text(to_markdown(done, summary, machine))
    if results is not None:
        section = {
            "machine": machine,
            "summary": summary,
            "trials": [
                {k: v for k, v in dataclasses.asdict(t).items() if not k.endswith("_ranks")}
                for t in done.values()
            ],
        }
        save_results_section(results, "retriever_tuning", section)
    print(f"best on validation: {summary['best']} -> {markdown}")


if __name__ == "__main__":
    main()
