"""Training and evaluation: the only layer that loops over epochs and writes run files.

``train`` reads top to bottom: load the data, assemble the experiment (:mod:`.experiment`),
create the run directory, then the loop (:mod:`.loop`): for each epoch shuffle, step the rule and
the optimiser on every batch, checkpoint, score the validation split; finally score the test
split with the final model. Around the loop, :mod:`.drive` keeps the run's status, sinks, final
summary and plots whatever the outcome.

One job a module:

* :mod:`.experiment` — a recipe and its data assembled into an :class:`Experiment`
* :mod:`.loop` — the epochs and batches
* :mod:`.state` — the training position and what a checkpoint holds to resume it bit for bit
* :mod:`.evaluation` — scoring a split, and a checkpoint on its own (``eprun eval``)
* :mod:`.monitors` — the measurements ``train.*_every`` asks for
* :mod:`.divergence` — NaN/Inf found and named
* :mod:`.stop_signals` — SIGINT/SIGTERM turned into a clean stop
* :mod:`.drive` — one run's life around the loop
* :mod:`.training`, :mod:`.resuming` — starting a run, continuing one
* :mod:`.fast_dev` — a recipe checked end to end in seconds
"""

from eprun.runner.divergence import Diverged, first_non_finite
from eprun.runner.evaluation import evaluate, evaluate_checkpoint
from eprun.runner.experiment import Experiment, assemble, load_data
from eprun.runner.fast_dev import fast_dev_run
from eprun.runner.resuming import resume
from eprun.runner.state import Position, Window, batches_per_epoch, checkpoint_state, restore
from eprun.runner.stop_signals import Interrupted
from eprun.runner.training import paired_recipe, train

__all__ = ["Diverged", "Experiment", "Interrupted", "Position", "Window", "assemble", "batches_per_epoch",
           "checkpoint_state", "evaluate", "evaluate_checkpoint", "fast_dev_run", "first_non_finite", "load_data",
           "paired_recipe", "restore", "resume", "train"]
