"""Reading checkpoints safely, and choosing the one a run continues from.

Every checkpoint medvlp reads goes through :func:`read_checkpoint`:

* ``torch.load(..., weights_only=True)``: tensors and plain containers only, so a file that would run
  code when unpickled (a ``__reduce__`` payload) is refused with :class:`UnsafeCheckpointError`
  and nothing in it runs;
* the zip archive's CRC of every member is checked first (``torch.load`` does not check the tensor
  records), so a file damaged inside an intact zip directory is reported as corrupt instead of
  loading wrong weights.

:func:`latest_checkpoint` verifies candidates this way, newest first, and falls back to the previous
complete one, naming each file it passes over and why.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, cut short or corrupt; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds objects other than tensors and plain containers; it is never unpickled."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """A run directory has no checkpoint file at all."""


def _unsafe_reason(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln]
    return (named or lines[-1:] or [type(err).__name__])[0]


def check_archive(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a readable, complete zip archive whose every
    member passes its CRC check (reads the whole file once)."""
    path = Path(path)
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint {path} does not exist.") from None
    except PermissionError as err:
        raise CheckpointError(f"Cannot read checkpoint {path}: permission denied ({err.strerror}).") from None
    except IsADirectoryError:
        raise CheckpointError(f"Checkpoint {path} is a directory, not a checkpoint file.") from None
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"Checkpoint {path} is incomplete or not a checkpoint: it is not a zip archive "
                              f"(a write cut short by a kill or a full disk leaves such a file).")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as err:
        raise CheckpointError(f"Checkpoint {path} is corrupt: {err}.") from None
    if bad is not None:
        raise CheckpointError(f"Checkpoint {path} is corrupt: its record '{bad}' fails its CRC check.")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The contents of a checkpoint, read without running any code from it.

    Raises:
        UnsafeCheckpointError: the file would run code or build arbitrary objects when unpickled.
        CheckpointError: missing, unreadable, incomplete or corrupt; the message names the file.
    """
    import torch

    path = Path(path)
    check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it holds objects other than tensors and plain containers "
            f"({_unsafe_reason(err)}). A checkpoint written by medvlp never does; this file was written by "
            f"other code or altered. Nothing in it was run."
        ) from None
    except Exception as err:  # noqa: BLE001 - torch raises many types on a damaged file
        raise CheckpointError(f"Checkpoint {path} could not be read ({type(err).__name__}: {err}).") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint (it has no 'state_dict').")
    return state


def candidates(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint files, newest first."""
    ckdir = Path(run_dir) / CKPT_DIR
    stamped = []
    for path in ckdir.glob("*.ckpt"):
        try:  # a running run may remove an old checkpoint meanwhile
            if path.is_file():
                stamped.append((path.stat().st_mtime_ns, path.name == "last.ckpt", path))
        except FileNotFoundError:
            continue
    return [p for *_, p in sorted(stamped, key=lambda t: t[:2], reverse=True)]


def load_latest(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(path, contents)`` of the newest checkpoint of ``run_dir`` that reads back completely.

    A file that is cut short, corrupt or unreadable is passed over with a warning naming it and
    why; an unsafe one stops everything (:class:`UnsafeCheckpointError`).

    Raises:
        NoCheckpointError: the run has no checkpoint file.
        CheckpointError: every checkpoint file is broken (each named with its reason).
    """
    ckdir = Path(run_dir) / CKPT_DIR
    found = candidates(run_dir)
    if not found:
        raise NoCheckpointError(f"No checkpoint in {ckdir}: the run stopped before its first checkpoint.")
    broken: list[str] = []
    for path in found:
        try:
            state = read_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s Falling back to the previous one.", path.name, err)
            broken.append(f"{path.name}: {err}")
            continue
        return path, state
    raise CheckpointError(f"Every checkpoint in {ckdir} is broken, so the run cannot continue:\n  "
                          + "\n  ".join(broken))


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of ``run_dir`` that reads back completely (see :func:`load_latest`)."""
    return load_latest(run_dir)[0]


__all__ = ["CheckpointError", "UnsafeCheckpointError", "NoCheckpointError", "read_checkpoint", "check_archive",
           "load_latest", "latest_checkpoint", "candidates", "CKPT_DIR"]
