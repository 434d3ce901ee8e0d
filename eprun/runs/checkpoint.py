"""Checkpoints: tensors and plain data only, written atomically, loaded with weights_only.

A checkpoint is a dict saved with :func:`torch.save`, tagged with ``"format":
CHECKPOINT_FORMAT``. Loading uses ``torch.load(..., weights_only=True)``, which refuses any
pickle that would import or call code; every failure becomes one :class:`CheckpointError`
line, so the CLI can print it and exit with code 2.

torch is imported inside the functions, so ``import eprun.runs`` stays cheap for commands
that only read metrics (``eprun compare``).
"""

from __future__ import annotations

import collections
import io
import warnings
from pathlib import Path
from typing import Any

from eprun.errors import CheckpointError
from eprun.runs.atomic import atomic_write_bytes

CHECKPOINT_FORMAT = "eprun-checkpoint-1"

#: Plain leaf types that ``torch.load(weights_only=True)`` reads back, matched exactly: a
#: float subclass such as numpy.float64 pickles as a numpy global and is refused on load.
#: Tensors (and Parameters), torch.dtype, torch.device and torch.Size are accepted as well.
_PLAIN_LEAVES = (str, int, float, bool, complex, bytes, type(None))
_MAPPINGS = (dict, collections.OrderedDict)
_SEQUENCES = (list, tuple)


def check_state(obj: Any, where: str = "state") -> None:
    """Raise ``TypeError`` naming the key path of the first value a weights-only load refuses."""
    import torch

    kind = type(obj)
    torch_leaves = (torch.Tensor, torch.dtype, torch.device, torch.Size)
    if kind in _PLAIN_LEAVES or isinstance(obj, torch_leaves):
        return
    if kind in _MAPPINGS:
        for key, value in obj.items():
            if type(key) not in _PLAIN_LEAVES:
                raise TypeError(f"checkpoint {where}: key {key!r} is not plain data")
            check_state(value, f"{where}[{key!r}]")
        return
    if kind in _SEQUENCES:
        for i, value in enumerate(obj):
            check_state(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint {where}: {kind.__module__}.{kind.__qualname__} is not allowed "
        "(only tensors and dict/list/tuple/str/int/float/bool/None)"
    )


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save ``state`` (tensors and plain data only) to ``path`` atomically.

    The ``"format"`` key is set to :data:`CHECKPOINT_FORMAT` (first key). Values that a
    weights-only load would refuse raise ``TypeError`` here, before anything is written.
    """
    import torch

    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    tagged = {"format": CHECKPOINT_FORMAT, **{k: v for k, v in state.items() if k != "format"}}
    check_state(tagged)
    buffer = io.BytesIO()
    torch.save(tagged, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


_TORCH_BOILERPLATE = ("Weights only load failed", "In PyTorch", "Check the documentation")


def _unpickler_reason(text: str) -> str:
    """The informative line of torch's long weights-only refusal message."""
    for line in (line.strip() for line in text.splitlines()):
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        if line and not line.startswith(_TORCH_BOILERPLATE):
            return _first_sentence(line)
    return "unsupported content"


def _short_reason(exc: BaseException) -> str:
    """A one-line reason from a (possibly long, multi-line) torch.load exception."""
    text = str(exc)
    if text.startswith("Weights only load failed"):
        return "refused by the weights-only unpickler: " + _unpickler_reason(text)
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, EOFError):
        return "empty or cut short"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _first_sentence(lines[0]) if lines else type(exc).__name__


def _first_sentence(text: str, limit: int = 160) -> str:
    """``text`` cut at its first '. ' and at ``limit`` characters."""
    text = text.split(". ", 1)[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _format_of(state: Any) -> str:
    """The format tag of a loaded object, as shown in messages ("none" if it has none)."""
    if not isinstance(state, dict):
        return f"none (a {type(state).__name__}, not a dict)"
    return "none" if state.get("format") is None else repr(state["format"])


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load an eprun checkpoint safely (``weights_only=True``) and check its format tag.

    Raises :class:`CheckpointError` with one line: ``"<path>: not a loadable eprun checkpoint
    (<reason>)"`` for a missing, truncated, corrupt or unsafe file, and ``"<path>:
    incompatible checkpoint format X, expected Y"`` for a loadable file of another format.
    """
    import torch

    path = Path(path)
    try:
        data = path.read_bytes()
        with warnings.catch_warnings():  # e.g. "unexpected pickle protocol": we report instead
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # any failure of an untrusted file is the user's, not ours
        raise CheckpointError(
            f"{path}: not a loadable eprun checkpoint ({_short_reason(e)})"
        ) from e
    found = _format_of(state)
    if found != repr(CHECKPOINT_FORMAT):
        raise CheckpointError(
            f"{path}: incompatible checkpoint format {found}, expected {CHECKPOINT_FORMAT!r}"
        )
    return state
