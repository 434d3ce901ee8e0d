"""CIFAR-10 and CIFAR-100 from the standard "python version" pickle batches.

The layout is the one of the official archives (and of torchvision)::

    cifar-10-batches-py/     data_batch_1 … data_batch_5, test_batch   (batches.meta)
    cifar-100-python/        train, test                                (meta)

Each batch is a pickled dict (written by Python 2: keys and strings are byte strings) with
``data``, a uint8 array (n, 3072) whose row is the 32×32 red plane, then green, then blue,
each row-major, and a list of n labels under ``labels`` (CIFAR-10, 0..9) or ``fine_labels``
(CIFAR-100, 0..99). The meta files (class names) are not needed and not read.

The data root is the ``root`` argument, else ``$EPRUN_DATA``, else ``./data``. The batches
are looked for in ``<root>/cifar-10-batches-py/`` (``cifar-100-python/``), then in
``<root>/`` itself. When neither holds them all:

1. an official archive ``<root>/cifar-10-python.tar.gz`` (``cifar-100-python.tar.gz``) is
   extracted into ``<root>/``: only the expected members, as regular files, written under
   names eprun builds itself (no path from the archive is used, so no path traversal);
2. otherwise torchvision's download is tried once (skipped when ``$EPRUN_OFFLINE`` or
   ``$CI`` is set);
3. then a :class:`DataError` names the missing files and the folders searched.

Pickles can run arbitrary code when loaded, so the batches are read with
:class:`SafeUnpickler`, which resolves only the few globals that numpy arrays need
(:data:`ALLOWED_GLOBALS`) and refuses every other one with a :class:`DataError`.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import logging
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eprun.data.download import try_torchvision_download
from eprun.data.mnist import resolve_root
from eprun.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SHAPE = (3, 32, 32)
PIXELS = 3 * 32 * 32

#: Largest archive member extracted (the biggest real one, CIFAR-100 ``train``, is 155 MB).
MAX_MEMBER_BYTES = 1 << 30


@dataclass(frozen=True)
class CifarSource:
    """Where one CIFAR dataset lives and how its batches are keyed."""

    name: str                       # as in the recipe: "cifar10", "cifar100"
    folder: str                     # folder inside the archive: "cifar-10-batches-py"
    archive: str                    # official archive name: "cifar-10-python.tar.gz"
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    labels_key: str                 # "labels" or "fine_labels"
    num_classes: int
    torchvision_class: str          # "CIFAR10", "CIFAR100"
    meta_file: str                  # extracted from the archive too; never read

    @property
    def files(self) -> tuple[str, ...]:
        """The batch files that must all be present."""
        return self.train_files + self.test_files


SOURCES: dict[str, CifarSource] = {
    "cifar10": CifarSource(
        "cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        labels_key="labels", num_classes=10, torchvision_class="CIFAR10", meta_file="batches.meta",
    ),
    "cifar100": CifarSource(
        "cifar100", "cifar-100-python", "cifar-100-python.tar.gz",
        train_files=("train",), test_files=("test",),
        labels_key="fine_labels", num_classes=100, torchvision_class="CIFAR100", meta_file="meta",
    ),
}

CifarTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load_cifar(name: str, root: str | os.PathLike | None = None) -> CifarTensors:
    """Load ``name`` ("cifar10" or "cifar100") as (x_train, y_train, x_test, y_test).

    Images are uint8 (n, 3, 32, 32), labels int64 (n,), all on the CPU.
    """
    source = SOURCES[name]
    folder = find_folder(source, resolve_root(root))
    return read_cifar_folder(folder, name)


def candidate_dirs(source: CifarSource, root: Path) -> list[Path]:
    """Folders searched, in order, for the batch files."""
    return [root / source.folder, root]


def find_folder(source: CifarSource, root: Path) -> Path:
    """The first candidate folder with every batch; else extract the archive, else download."""
    dirs = candidate_dirs(source, root)
    folder = _first_complete(source, dirs)
    if folder is None and (root / source.archive).is_file():
        folder = extract_archive(source, root / source.archive, root)
    if folder is None and try_torchvision_download(source.name, source.torchvision_class, root, root):
        folder = _first_complete(source, dirs)
    if folder is None:
        raise DataError(_missing_message(source, root, dirs))
    return folder


def read_cifar_folder(folder: Path, name: str) -> CifarTensors:
    """Read and check every batch of ``name`` in ``folder``; train batches are concatenated."""
    source = SOURCES[name]
    missing = [f for f in source.files if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name}: missing {', '.join(missing)} in {folder}")
    x_train, y_train = _read_batches(source, [folder / f for f in source.train_files])
    x_test, y_test = _read_batches(source, [folder / f for f in source.test_files])
    return x_train, y_train, x_test, y_test


def read_batch(path: Path, labels_key: str, num_classes: int, name: str = "cifar") -> tuple[np.ndarray, np.ndarray]:
    """One batch file → (images uint8 (n, 3072), labels int64 (n,)), checked.

    DataError naming ``path`` when the file is not a safe, well-formed CIFAR batch.
    """
    batch = load_pickle(path, name)
    if not isinstance(batch, dict):
        raise DataError(
            f"{name}: {path}: holds a pickled {type(batch).__name__}; "
            f"expected a dict with 'data' and {labels_key!r} (a CIFAR python batch)"
        )
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    missing = [key for key in ("data", labels_key) if key not in batch]
    if missing:
        found = ", ".join(repr(k) for k in batch) or "nothing"
        raise DataError(f"{name}: {path}: missing key {', '.join(map(repr, missing))} (found {found}); "
                        f"expected a dict with 'data' and {labels_key!r}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{name}: {path}: 'data' is a {desc}; expected a uint8 array of shape (n, {PIXELS})")
    labels = _as_labels(batch[labels_key], path, labels_key, name)
    if len(labels) != len(data):
        raise DataError(f"{name}: {path}: {len(data)} images but {len(labels)} {labels_key!r}; "
                        f"expected the same count")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataError(f"{name}: {path}: label {bad} out of range; expected 0..{num_classes - 1}")
    return data, labels


def _read_batches(source: CifarSource, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and concatenate batches: uint8 (n, 3, 32, 32) and int64 (n,) tensors."""
    pairs = [read_batch(p, source.labels_key, source.num_classes, source.name) for p in paths]
    images = np.concatenate([x for x, _ in pairs]).reshape(-1, *IMAGE_SHAPE)
    labels = np.concatenate([y for _, y in pairs])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _as_labels(value: object, path: Path, labels_key: str, name: str) -> np.ndarray:
    """A list (or 1-D array) of integers as an int64 array; DataError otherwise."""
    if isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
        return np.asarray(value, dtype=np.int64).reshape(-1)
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        return value.astype(np.int64)
    raise DataError(f"{name}: {path}: {labels_key!r} is a {type(value).__name__}, not a list of "
                    f"integer labels; expected a list of n ints")


# --------------------------------------------------------------------------- safe pickles


def _numpy_reconstruct():
    """numpy's array-rebuilding function, found without importing ``numpy.core`` (deprecated)."""
    return np.ndarray((0,), np.uint8).__reduce__()[0]


def _numpy_frombuffer():
    """numpy's function for arrays pickled with protocol 5."""
    return np.zeros(1, np.uint8).__reduce_ex__(5)[0]


class _Refused(pickle.UnpicklingError):
    """A pickle that asks for something a dataset batch never needs; becomes a DataError."""


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to latin-1: how Python 3 pickles bytes in protocol 2."""
    if not isinstance(encoding, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise _Refused(f"pickle calls _codecs.encode with codec {encoding!r}; only latin1 is allowed")
    return codecs.encode(text, "latin1", "strict")


#: (module, name) → object: everything a CIFAR (or ImageNet32) batch may reference. Real
#: batches (Python 2, numpy 1) name ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``
#: and ``numpy.dtype``; numpy 2 writes ``numpy._core…``; batches re-pickled by Python 3 in
#: protocol 2 add ``_codecs.encode`` (for bytes), in protocol 5 ``numpy._core.numeric._frombuffer``.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer(),
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; anything else is a DataError.

    Without globals a pickle can only build plain data (dicts, lists, str, bytes, numbers),
    so nothing in the file gets to run code.
    """

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str) -> object:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise _Refused(f"pickle references {module}.{name}; a dataset batch may only reference numpy arrays")
        return allowed

    def persistent_load(self, pid: object) -> object:
        raise _Refused("pickle uses persistent ids; a dataset batch has none")


def load_pickle(path: Path, name: str = "cifar", expected: str = "a CIFAR python batch") -> object:
    """Unpickle ``path`` with :class:`SafeUnpickler`; DataError naming the file on any failure.

    ``name`` starts the error messages; ``expected`` says what the file should have been.
    """
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f).load()
    except _Refused as err:
        raise DataError(f"{name}: {path}: refuses to load: {err} (is this file from the official archive?)") from None
    except OSError as err:
        raise DataError(f"{name}: {path}: cannot read: {err.strerror or err}") from err
    except Exception as err:  # noqa: BLE001 - truncated or corrupt pickles fail in many ways
        raise DataError(f"{name}: {path}: corrupt or truncated pickle ({type(err).__name__}: {err}); "
                        f"expected {expected}") from err


# --------------------------------------------------------------------------- archive and download


def extract_archive(source: CifarSource, archive: Path, root: Path) -> Path:
    """Extract the expected members of the official archive into ``root/<folder>``.

    Only members named exactly ``<folder>/<file>`` (optionally ``./``-prefixed) for the batch
    and meta files are read, only as regular files, and each is written to a path built here
    (``root/<folder>/<file>``) through a temporary file and a rename. Returns the folder.
    """
    target = root / source.folder
    wanted = {f"{source.folder}/{f}": f for f in (*source.files, source.meta_file)}
    done: set[str] = set()
    log.info("%s: extracting %s into %s", source.name, archive, target)
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                member_name = member.name[2:] if member.name.startswith("./") else member.name
                filename = wanted.get(member_name)
                if filename is None or filename in done:
                    continue
                if not member.isfile() or member.size > MAX_MEMBER_BYTES:
                    raise DataError(f"{source.name}: {archive}: member {member.name} is not a regular file "
                                    f"of at most {MAX_MEMBER_BYTES} bytes; expected the official archive")
                _write_member(tar, member, target / filename)
                done.add(filename)
    except DataError:
        raise
    except (OSError, tarfile.TarError, EOFError, zlib.error) as err:
        raise DataError(
            f"{source.name}: cannot extract {archive} into {root} ({type(err).__name__}: {err}); "
            f"extract it by hand (tar xzf {archive.name}) or replace it with a complete copy"
        ) from err
    missing = [f for f in source.files if f not in done]
    if missing:
        raise DataError(f"{source.name}: {archive}: lacks {', '.join(source.folder + '/' + f for f in missing)}; "
                        f"expected the official {source.archive}")
    return target


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    """Copy one archive member to ``path`` atomically (temporary file, then rename)."""
    src = tar.extractfile(member)
    if src is None:
        raise tarfile.ExtractError(f"member {member.name} has no data")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _first_complete(source: CifarSource, dirs: list[Path]) -> Path | None:
    """The first folder holding every batch file."""
    for folder in dirs:
        if all((folder / f).is_file() for f in source.files):
            return folder
    return None


def _missing_message(source: CifarSource, root: Path, dirs: list[Path]) -> str:
    """Name the files missing from the most complete folder, every folder searched, the fix."""
    best = max(dirs, key=lambda d: sum((d / f).is_file() for f in source.files))
    missing = [f for f in source.files if not (best / f).is_file()]
    searched = ", ".join(str(d) for d in dirs)
    return (
        f"{source.name}: missing {', '.join(missing)}; searched {searched}; put the "
        f"{source.folder}/ folder (or {source.archive}, extracted automatically) in {root} "
        f"or set data.root / $EPRUN_DATA"
    )
