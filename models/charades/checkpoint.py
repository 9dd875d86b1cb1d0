"""Checkpoints of a training run: written atomically, read with clear errors, holding every
random state so that a resumed run continues exactly as an uninterrupted one.

A checkpoint is one ``torch.save`` dictionary (read back with ``weights_only=True``: plain
tensors, numbers, strings, lists and dicts only). Writing goes to ``NAME.tmp`` in the same
folder, is flushed to disk, then renamed over ``NAME`` (``os.replace``, atomic on POSIX and
Windows): a run killed while writing leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from fieldlib.errors import FieldlibError

__all__ = ["CheckpointError", "atomic_save", "read_checkpoint", "rng_state", "set_rng_state"]

#: Format version of the checkpoint dictionary.
VERSION = 1


class CheckpointError(FieldlibError):
    """A checkpoint that is missing, corrupt, or of another run's configuration."""


def atomic_save(state: dict, path: Path) -> None:
    """``torch.save(state)`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write the checkpoint: "
                              f"{exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def read_checkpoint(path: Path) -> dict:
    """The dictionary saved at ``path``; CheckpointError naming the file when it is missing,
    not a torch file, truncated, or of another format version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated: "
                              f"{first[:200]})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a fieldlib training checkpoint (version "
                              f"{state.get('version') if isinstance(state, dict) else None}, "
                              f"expected {VERSION})")
    return state


def rng_state() -> dict:
    """Every random state a run draws from: Python's, numpy's global, torch's (CPU) and each
    CUDA device's, as tensors and plain numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s result."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
