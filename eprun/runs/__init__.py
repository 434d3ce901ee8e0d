"""Run directories: layout, atomic writes, metrics, env, summary, safe checkpoints, opening runs.

One run directory per run, never overwritten::

    runs/<recipe-name>-<YYYYmmdd-HHMMSS>[-n]/
      recipe.yaml  env.json  metrics.jsonl  summary.json
      checkpoints/last.pt  checkpoints/best.pt  plots/*.png
      tensorboard/  mlflow_run.json        (with train.log_to: tensorboard / mlflow)

Submodules, one job each: ``layout`` (file names), ``atomic`` (temp file + rename writes),
``metrics`` (JSON lines), ``env`` (env.json), ``checkpoint`` (weights-only checkpoints),
``rundir`` (create / find / open a run, summary), ``lock`` (one writer per run), ``sinks``
(copies of the metrics in TensorBoard or MLflow).
"""

from eprun.runs.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from eprun.runs.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from eprun.runs.env import write_env
from eprun.runs.lock import RunLock
from eprun.runs.layout import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    ENV_FILE,
    LAST_CHECKPOINT,
    METRICS_FILE,
    MLFLOW_RUN_FILE,
    PLOTS_DIR,
    RECIPE_FILE,
    RUN_FILES,
    SUMMARY_FILE,
    TENSORBOARD_DIR,
)
from eprun.runs.metrics import MetricsWriter, NoMetrics, read_metrics, truncate_metrics
from eprun.runs.rundir import (
    RunInfo,
    create_run_dir,
    create_stamped_dir,
    open_run,
    read_recipe,
    read_summary,
    run_dir_of,
    sanitize_name,
    write_summary,
)
from eprun.runs.sinks import MetricSinks, Sink, open_sinks

__all__ = [
    "BEST_CHECKPOINT",
    "CHECKPOINT_DIR",
    "CHECKPOINT_FORMAT",
    "ENV_FILE",
    "LAST_CHECKPOINT",
    "METRICS_FILE",
    "MLFLOW_RUN_FILE",
    "PLOTS_DIR",
    "RECIPE_FILE",
    "RUN_FILES",
    "SUMMARY_FILE",
    "TENSORBOARD_DIR",
    "MetricSinks",
    "MetricsWriter",
    "NoMetrics",
    "RunInfo",
    "RunLock",
    "Sink",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "create_run_dir",
    "create_stamped_dir",
    "load_checkpoint",
    "open_run",
    "open_sinks",
    "read_metrics",
    "read_recipe",
    "read_summary",
    "run_dir_of",
    "sanitize_name",
    "truncate_metrics",
    "save_checkpoint",
    "write_env",
    "write_summary",
]
