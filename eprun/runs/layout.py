"""Names of the files inside a run directory."""

RECIPE_FILE = "recipe.yaml"
ENV_FILE = "env.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "checkpoints/last.pt"
BEST_CHECKPOINT = "checkpoints/best.pt"
PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tensorboard"  # event files of the TensorBoard sink (train.log_to)
MLFLOW_RUN_FILE = "mlflow_run.json"  # the MLflow run the MLflow sink logs into, continued on resume
LOCK_FILE = ".lock"

#: Everything a run directory may hold, relative to it (directories end with "/").
RUN_FILES = (
    RECIPE_FILE,
    ENV_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    LAST_CHECKPOINT,
    BEST_CHECKPOINT,
    PLOTS_DIR + "/",
    TENSORBOARD_DIR + "/",
    MLFLOW_RUN_FILE,
)

#: Subfolders a run directory is created with; a path inside one belongs to its parent run.
SUBDIRS = (CHECKPOINT_DIR, PLOTS_DIR)
