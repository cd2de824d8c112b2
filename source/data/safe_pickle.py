"""Reading pickled data files (the CIFAR batches) without letting them run code.

``pickle.load`` calls whatever a file names: a crafted data file can name
``os.system`` and run a shell command while it is read. The unpickler here
resolves only the few names that pickled numpy arrays need; any other name
refuses the file before anything is called. Dicts, lists, tuples, strings,
bytes and numbers have opcodes of their own and need no name at all.

Admitted names (every other one is refused):

- ``numpy.core.multiarray._reconstruct`` (numpy < 2 and Python 2, as in the
  official CIFAR files) and ``numpy._core.multiarray._reconstruct`` (numpy >= 2),
  with ``numpy.ndarray`` and ``numpy.dtype``: how pickle protocols 0 to 4 store an
  array;
- ``numpy.core.numeric._frombuffer`` and ``numpy._core.numeric._frombuffer``: how
  protocol 5 (Python 3.14's default) stores one;
- ``_codecs.encode``, latin-1 only: how Python 3 stores bytes (the array's pixels)
  at protocols 0 to 2.
"""

from __future__ import annotations

import pickle
from os import PathLike

import numpy as np

__all__ = ["RefusedPickle", "load_data_pickle"]

# numpy's array reconstructor, taken from its own pickle of an array: the same function
# whether this numpy keeps it in numpy.core (< 2) or numpy._core (>= 2).
_reconstruct = np.ndarray(0).__reduce__()[0]


class _ArrayFromBuffer:
    """numpy's protocol-5 array reconstructor: the bytes read as ``dtype``, in ``shape`` and ``order``."""

    __slots__ = ()

    def __call__(self, buffer, dtype, shape, order):
        return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


class _Latin1Bytes:
    """Python 3's pickle of bytes at protocols 0 to 2: ``_codecs.encode(text, "latin1")``."""

    __slots__ = ()

    def __call__(self, text, encoding):
        if not isinstance(text, str) or encoding != "latin1":
            raise pickle.UnpicklingError(f"it asks to encode bytes as {encoding!r}, which the format never does")
        return text.encode("latin-1")


# The (module, name) pairs a data file may ask for, and what each resolves to. All are
# builtins or slotted instances, so pickle's BUILD opcode cannot set attributes on them.
_ADMITTED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.numeric", "_frombuffer"): _ArrayFromBuffer(),
    ("numpy._core.numeric", "_frombuffer"): _ArrayFromBuffer(),
    ("_codecs", "encode"): _Latin1Bytes(),
}


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that asks for something a data file never holds; the message says what."""


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names in ``_ADMITTED``."""

    def find_class(self, module: str, name: str):
        try:
            return _ADMITTED[module, name]
        except KeyError:
            raise RefusedPickle(f"it asks to load {module}.{name}, which the format never holds") from None

    def persistent_load(self, persistent_id):
        raise RefusedPickle("it asks for a persistent object, which the format never holds")


def load_data_pickle(path: str | PathLike) -> object:
    """The content of the pickled data file ``path``, read as Python 2 files need (latin-1 strings).

    Raises ``RefusedPickle`` when the file names anything outside numpy's array
    reconstruction, before calling anything, and ``pickle.UnpicklingError`` (or
    EOFError, ValueError, KeyError, IndexError, as ``pickle.load`` does) when it is
    damaged.
    """
    with open(path, "rb") as file:
        try:
            return _DataUnpickler(file, encoding="latin1").load()
        except (TypeError, AttributeError, OverflowError, SystemError) as error:
            # What the admitted callables and the BUILD opcode raise on arguments no
            # array pickle holds (numpy's dtype raises SystemError on some): a damaged file.
            raise pickle.UnpicklingError(" ".join(str(error).split()) or type(error).__name__) from error
        except MemoryError as error:
            # The unpickler sizes its tables from the file, so a damaged one can ask for terabytes.
            raise pickle.UnpicklingError("it asks for more memory than there is (a damaged file?)") from error
