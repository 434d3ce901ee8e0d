"""The MLflow sink: one MLflow run per eprun run, continued when the eprun run is resumed.

Store: ``MLFLOW_TRACKING_URI`` when set, else a SQLite file next to the run directories,
``<runs>/mlflow.db``. The MLflow run is named after the run directory, in the experiment
``MLFLOW_EXPERIMENT_NAME`` (default ``eprun``), with the resolved recipe's values as params
(dotted keys) and the run directory as the tag ``eprun.run_dir``; its status at the end
follows summary.json's. Its id is kept in ``<run>/mlflow_run.json``: a resumed run logs into
the same MLflow run. MLflow cannot take points back, so the records written between the
checkpoint resumed from and the stop are in its history twice (the later ones are the
records metrics.jsonl keeps). Params are logged once, when the MLflow run is created.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from eprun.runs.atomic import atomic_write_json
from eprun.runs.layout import MLFLOW_RUN_FILE
from eprun.runs.sinks.base import metric_values

DEFAULT_EXPERIMENT = "eprun"
DEFAULT_STORE = "mlflow.db"
RUN_DIR_TAG = "eprun.run_dir"
#: summary.json's status → the MLflow run's
MLFLOW_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED", "diverged": "FAILED"}
PARAM_VALUE_LIMIT = 6000  # MLflow's longest param value
PARAMS_PER_BATCH = 100  # MLflow's most params in one log_batch
METRICS_PER_BATCH = 1000  # MLflow's most metrics in one log_batch


def tracking_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite store ``<run_dir's parent>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve().parent / DEFAULT_STORE}"


def flat_params(plain: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A recipe's values as MLflow params: dotted keys, each value as YAML-readable text."""
    params = {}
    for key, value in plain.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{name}."))
        else:
            params[name] = (value if isinstance(value, str) else json.dumps(value))[:PARAM_VALUE_LIMIT]
    return params


class MLflowSink:
    """Every metric of a record in one ``log_batch`` at the record's step."""

    name = "mlflow"

    def __init__(self, run_dir: Path, recipe: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric, self._param = Metric, Param
        uri = tracking_uri(run_dir)
        self._client = MlflowClient(tracking_uri=uri)
        known = run_dir / MLFLOW_RUN_FILE
        if known.exists():  # resumed: the same MLflow run, running again
            self.run_id = json.loads(known.read_text())["run_id"]
            self._client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self._start(run_dir, recipe, uri)

    def _start(self, run_dir: Path, recipe: dict[str, Any], uri: str) -> str:
        experiment_id = self._experiment_id(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
        run = self._client.create_run(experiment_id, run_name=run_dir.name,
                                      tags={RUN_DIR_TAG: str(run_dir.resolve())})
        run_id = run.info.run_id
        atomic_write_json(run_dir / MLFLOW_RUN_FILE,
                          {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri})
        params = [self._param(key, value) for key, value in flat_params(recipe).items()]
        for chunk in _chunks(params, PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=chunk)
        return run_id

    def _experiment_id(self, name: str) -> str:
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self._client.create_experiment(name)
        except Exception:  # noqa: BLE001 (another run may have created it in the meantime)
            found = self._client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log(self, record: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(key, value, now, record["step"]) for key, value in metric_values(record).items()]
        for chunk in _chunks(metrics, METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)

    def close(self, status: str) -> None:
        self._client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


def _chunks(items: list, size: int) -> Iterable[list]:
    return (items[i:i + size] for i in range(0, len(items), size))
