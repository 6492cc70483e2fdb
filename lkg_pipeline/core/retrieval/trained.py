"""A trained retriever: its progress lines, its report against popularity, and its folder."""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from lkg_pipeline.core.retrieval.ranking import popularity_report, retriever_report
from lkg_pipeline.core.retrieval.seqrec import RetrieverConfig, save_retriever
from lkg_pipeline.core.retrieval.sequences import UserSequences
from lkg_pipeline.core.retrieval.training import TrainResult

PROGRESS_FIELDS = ("epoch", "step", "loss", "val_Recall@10", "val_NDCG@10", "best")


def progress(record: dict) -> dict:
    """An epoch's record cut to what a person follows, floats to 4 places: a readable log line."""
    return {
        k: round(v, 4) if isinstance(v, float) else v
        for k, v in record.items()
        if k in PROGRESS_FIELDS
    }


def report_with_popularity(
    result: TrainResult, data: UserSequences, name: str, ks: Sequence[int], k: int = 20
) -> dict:
    """The retriever's val/test metrics beside popularity's: a retriever must beat the baseline."""
    return {
        name: retriever_report(result.model, data, ks, k),
        "popularity": popularity_report(data, ks, k),
    }


def save_trained(
    result: TrainResult,
    config: RetrieverConfig,
    dataset: str,
    code_version: str,
    report: dict,
    folder: Path,
) -> None:
    """Model and training record in one folder, so that they are replaced together."""
    save_retriever(result.model, config, folder)
    (folder / "training.json").write_text(
        json.dumps(
            {
                "dataset": dataset,
                "config": dataclasses.asdict(config),
                "code_version": code_version,
                "best_epoch": result.best_epoch,
                "wall_time_s": result.wall_time_s,
                "history": result.history,
                "metrics": report,
            },
            indent=2,
        )
    )
