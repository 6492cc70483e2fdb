"""The preference module's folder: the model, how it was trained, and every user's weights."""

import json
from pathlib import Path

from lkg_pipeline.core.io.storage import write_parquet_atomic
from lkg_pipeline.core.paths.preference_model import save_preference
from lkg_pipeline.core.paths.preference_training import FittedPreferences


def save_fitted(fitted: FittedPreferences, dataset: str, folder: Path) -> None:
    """Model, training record and preferences in one folder, so that they are replaced together."""
    result = fitted.result
    save_preference(result, result.model.config, fitted.path_types, folder)
    (folder / "training.json").write_text(
        json.dumps(
            {
                "dataset": dataset,
                "encoder": fitted.encoder,
                "val_ndcg10_by_encoder": fitted.val_ndcg10_by_encoder,
                "best_epoch": result.best_epoch,
                "pi_shift": result.pi_shift,
                "history": result.loss_history,
                "metrics": fitted.report,
            },
            indent=2,
            default=float,
        )
    )
    write_parquet_atomic(fitted.preferences, folder / "preferences.parquet")
