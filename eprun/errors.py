"""User-facing errors.

Every error a user can cause (bad recipe, missing data, bad checkpoint, bad run directory)
is an :class:`EprunError`: the CLI prints its one-line message and exits with code 2.
"""


class EprunError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""

    exit_code = 2


class RecipeError(EprunError):
    """A recipe that cannot be read or does not validate."""


class DataError(EprunError):
    """A dataset that is missing, corrupt or does not fit the recipe."""


class CheckpointError(EprunError):
    """A checkpoint that cannot be loaded safely or does not fit the network."""


class RunDirError(EprunError):
    """A path that is not an eprun run directory."""


class StorageError(EprunError):
    """A file could not be written (disk full, file-size limit, permissions): an environmental
    fault, not bad input; exit code 1. Every file is written atomically, so what was written
    before stays whole."""

    exit_code = 1


class SweepError(EprunError):
    """A sweep that cannot be planned (a bad grid or Slurm setting), read or resumed."""
