"""Checkpoint files written atomically, and the random-generator states a resume restores."""

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "capture_random_state",
    "load_checkpoint",
    "restore_random_state",
    "save_atomically",
    "write_text_atomically",
]


def _replace_atomically(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_atomically(state, path):
    """``torch.save(state)`` to ``path`` atomically."""
    _replace_atomically(path, lambda file: torch.save(state, file))


def write_text_atomically(text, path):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _replace_atomically(path, lambda file: file.write(text.encode("utf-8")))


def load_checkpoint(path):
    """Read a checkpoint written by ``save_atomically`` onto the CPU (tensors and plain values only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


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
