"""Checkpoint files written atomically and checked when read, and the random-generator states a resume restores.

Every save keeps the file it replaces as ``<name>.previous.pt`` (last.pt → last.previous.pt,
best.pt → best.previous.pt), so a resume can fall back to it when the newer file is damaged,
and refuses a model state holding a non-finite value: no checkpoint ever carries a diverged
model. Files are replaced, never written through a link (``source.files.confined``). Reading
never runs code (``torch.load(weights_only=True)``), and a file that cannot be read gives one
short ``UserError`` line.
"""

import contextlib
import os
import pickle
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from source.errors import UserError, WriteFailed, writing
from source.files import remove_partial_files, replace_atomically, write_text_atomically

__all__ = [
    "capture_random_state",
    "load_checkpoint",
    "non_finite_entry",
    "previous_path",
    "read_checkpoint",
    "remove_partial_files",
    "restore_random_state",
    "save_atomically",
    "save_checkpoint",
    "write_text_atomically",
]

_LONGEST_DETAIL = 100


def save_atomically(state, path):
    """``torch.save(state)`` to ``path`` atomically, replacing (never writing through) what is there."""
    replace_atomically(path, lambda file: torch.save(state, file))


def previous_path(path):
    """Where ``save_checkpoint`` keeps the file it replaced: last.pt → last.previous.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def non_finite_entry(model_state):
    """The name of the first floating-point tensor in ``model_state`` holding NaN or ±inf, or None."""
    for name, tensor in model_state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def save_checkpoint(state, path):
    """Save ``state`` (whose "model" entry is a model's state dict) to ``path``, keeping the old file.

    The file ``path`` held before is renamed to ``previous_path(path)`` first; a kill between the
    two steps leaves only the previous file, which a resume falls back to; a write that fails
    (``WriteFailed``) puts the old file back. Raises ``ValueError`` (and writes nothing) when a
    model parameter or buffer is not finite.
    """
    name = non_finite_entry(state["model"])
    if name is not None:
        raise ValueError(f"the model's {name} is not finite")
    path = Path(path)
    previous = previous_path(path)
    rotated = path.exists()
    if rotated:
        with writing(path):
            os.replace(path, previous)
    try:
        save_atomically(state, path)
    except WriteFailed:
        if rotated:
            # The old file is still the newest good one: it goes back, so a resume needs no fallback.
            with contextlib.suppress(OSError):
                os.replace(previous, path)
        raise


def load_checkpoint(path):
    """Read a checkpoint written by ``save_atomically`` onto the CPU (tensors and plain values only).

    ``weights_only=True`` unpickles tensors and plain containers only, so a crafted file cannot
    run code when it is read.
    """
    with warnings.catch_warnings():
        # torch warns about the pickle protocol of foreign files; the caller reports the problem.
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_problem(error):
    """A short description of why ``torch.load`` failed."""
    if isinstance(error, FileNotFoundError):
        return "it does not exist"
    if isinstance(error, IsADirectoryError):
        return "it is a folder, not a file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return "it holds objects other than tensors and plain values, and reading it could run code"
    # Text and other foreign bytes fail inside the unpickler in many ways (a text file: IndexError).
    if isinstance(error, (EOFError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError,
                          IndexError, TypeError)):
        return "it is truncated or not a PyTorch checkpoint"
    detail = " ".join(str(error).split())[:_LONGEST_DETAIL]
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def read_checkpoint(path, required=()):
    """``load_checkpoint(path)``, which must give a dict holding the ``required`` keys; ``UserError`` otherwise."""
    try:
        checkpoint = load_checkpoint(path)
    except Exception as error:  # any unreadable file is the user's to replace or remove
        raise UserError(f"cannot read the checkpoint {path}: {_read_problem(error)}") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"cannot read the checkpoint {path}: it holds a {type(checkpoint).__name__}, not a checkpoint")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise UserError(f"cannot use the checkpoint {path}: it lacks {', '.join(missing[:4])}, so it is damaged")
    return checkpoint


def capture_random_state():
    """The states of torch's CPU and CUDA generators, Python's and numpy's global generators."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": position,
            "has_gauss": has_gauss,
            "cached_gaussian": cached_gaussian,
        },
    }


def restore_random_state(state):
    """Set the generators to ``state`` from ``capture_random_state``.

    CUDA states are restored when this machine has as many GPUs as the saving one; a run moved
    between CPU and GPU continues with the CPU and host generators only.
    """
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
