"""Safe reading of the CIFAR pickles: crafted files are refused before any code runs, faithful copies load."""

from __future__ import annotations

import builtins
import os
import pickle
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest

import main
from source.data import build_datasets
from source.data.safe_pickle import RefusedPickle, load_data_pickle
from source.data.torchvision_sets import _CIFAR10Files
from source.errors import UserError
from tests.data_files import write_cifar10, write_cifar100

REPOSITORY = Path(__file__).resolve().parents[1]
REAL_CIFAR10 = REPOSITORY / "data" / "cifar-10-batches-py"

CIFAR10_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
DATA_FILE_POSITIONS = [("cifar10", name) for name in [*CIFAR10_FILES, "batches.meta"]] + [
    ("cifar100", name) for name in ["train", "test", "meta"]
]
FOLDERS = {"cifar10": ("cifar-10-batches-py", "CIFAR-10"), "cifar100": ("cifar-100-python", "CIFAR-100")}
WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100}


class ShellCommand:
    """Pickles as a call of os.system: unpickled by pickle.load, it runs ``command``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EvaluatedExpression:
    """Pickles as a call of builtins.eval on ``expression``."""

    def __init__(self, expression: str):
        self.expression = expression

    def __reduce__(self):
        return builtins.eval, (self.expression,)


def payloads(marker: Path) -> dict[str, object]:
    """Objects whose unpickling would create ``marker``, keyed by the global the file asks for."""
    return {
        "posix.system": ShellCommand(f"touch {shlex.quote(str(marker))}"),
        "builtins.eval": EvaluatedExpression(f"open({str(marker)!r}, 'w').close()"),
    }


def write_pickle(path: Path, content: object, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    path.write_bytes(pickle.dumps(content, protocol=protocol))


def cifar_batch(count: int = 3, *, label_key: str = "labels") -> dict:
    rows = np.arange(count * 3072, dtype=np.int64).reshape(count, 3072).astype(np.uint8)
    return {"batch_label": "a batch", label_key: [index % 10 for index in range(count)], "data": rows}


def python2_cifar_batch(rows: np.ndarray, labels: list[int]) -> bytes:
    """A batch as the official files store it: Python 2's cPickle at protocol 2, numpy.core names, str pixels."""

    def text(value: bytes) -> bytes:  # a Python 2 str
        return b"U" + bytes([len(value)]) + value

    def integer(value: int) -> bytes:
        return b"K" + bytes([value]) if value < 256 else b"M" + struct.pack("<H", value)

    dtype = (
        b"cnumpy\ndtype\n" + text(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + text(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + text(b"b") + b"\x87R"
        + b"(K\x01" + integer(rows.shape[0]) + integer(rows.shape[1]) + b"\x86" + dtype
        + b"\x89T" + struct.pack("<i", rows.nbytes) + rows.tobytes() + b"tb"
    )
    label_list = b"](" + b"".join(integer(label) for label in labels) + b"e"
    return b"\x80\x02}(" + text(b"data") + array + text(b"labels") + label_list + b"u."


# --- the unpickler -------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_arrays_and_plain_values_load_at_every_protocol(tmp_path, protocol):
    content = {**cifar_batch(), "sizes": (1, 2.5, None, True), "raw": b"\x00\xff", "names": ["a", "\u00e9"]}
    write_pickle(tmp_path / "file", content, protocol)
    loaded = load_data_pickle(tmp_path / "file")
    assert loaded.keys() == content.keys()
    assert loaded["data"].dtype == np.uint8 and np.array_equal(loaded["data"], content["data"])
    assert {key: value for key, value in loaded.items() if key != "data"} == {
        key: value for key, value in content.items() if key != "data"
    }


def test_the_official_python2_format_loads(tmp_path):
    rows = (np.arange(2 * 3072) * 7 % 256).astype(np.uint8).reshape(2, 3072)
    (tmp_path / "file").write_bytes(python2_cifar_batch(rows, [3, 9]))
    loaded = load_data_pickle(tmp_path / "file")
    assert loaded["labels"] == [3, 9]
    assert loaded["data"].dtype == np.uint8 and np.array_equal(loaded["data"], rows)


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("builtins", "getattr"),
        ("builtins", "__import__"),
        ("os", "system"),
        ("posix", "system"),
        ("subprocess", "Popen"),
        ("functools", "partial"),
        ("copyreg", "_reconstructor"),
        ("numpy", "load"),
        ("numpy.core.multiarray", "scalar"),
        ("torch._utils", "_rebuild_tensor"),
    ],
)
def test_every_other_global_is_refused_before_it_is_called(tmp_path, module, name):
    marker = tmp_path / "marker"
    argument = f"touch {marker}".encode()
    call = b"(" + b"U" + bytes([len(argument)]) + argument + b"tR."
    for raw in (
        b"\x80\x02c" + f"{module}\n{name}\n".encode() + call,  # GLOBAL, protocols 0 to 3
        b"\x80\x04" + b"\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(name)])
        + name.encode() + b"\x93" + call,  # STACK_GLOBAL, protocol 4 and 5
        b"(S'" + argument + b"'\ni" + f"{module}\n{name}\n".encode() + b".",  # INST, protocol 0
    ):
        (tmp_path / "file").write_bytes(raw)
        with pytest.raises(RefusedPickle, match=f"^it asks to load {module}.{name}, which the format never holds$"):
            load_data_pickle(tmp_path / "file")
    assert not marker.exists()


def test_persistent_ids_are_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"\x80\x02U\x02idQ.")
    with pytest.raises(RefusedPickle, match="persistent object"):
        load_data_pickle(tmp_path / "file")


def test_bytes_are_decoded_as_latin1_only(tmp_path):
    (tmp_path / "file").write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(pickle.UnpicklingError, match="as 'rot13', which the format never does"):
        load_data_pickle(tmp_path / "file")


@pytest.mark.parametrize(
    "module, name",
    [
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    ],
)
def test_build_cannot_change_an_admitted_callable(tmp_path, module, name):
    # GLOBAL, then BUILD with the state (None, {"attribute": 1}): pickle's way of setting attributes.
    (tmp_path / "file").write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"N}U\x09attributeK\x01s\x86b.")
    with pytest.raises(pickle.UnpicklingError):
        load_data_pickle(tmp_path / "file")
    (tmp_path / "file").write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b".")
    assert not hasattr(load_data_pickle(tmp_path / "file"), "attribute")


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\x80\x02cnumpy\ndtype\nU\x07garbage\x85R.", "data type 'garbage' not understood"),  # TypeError
        (b"\x80\x03cnumpy\nndarray\nK\x01U\x02u1C\x00\x87R.", "buffer is too small"),  # TypeError
        (b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"x", "more memory than there is"),  # MemoryError
    ],
    ids=["unknown dtype", "array without its bytes", "absurd length"],
)
def test_damaged_pickles_are_unpickling_errors(tmp_path, raw, reason):
    (tmp_path / "file").write_bytes(raw)
    with pytest.raises(pickle.UnpicklingError, match=reason):
        load_data_pickle(tmp_path / "file")


# --- the CIFAR readers ---------------------------------------------------------------------------


@pytest.mark.parametrize("embedded", [False, True], ids=["whole file", "inside a faithful batch"])
@pytest.mark.parametrize("dataset, file_name", DATA_FILE_POSITIONS)
def test_crafted_pickle_in_any_cifar_file_is_refused_and_never_runs(tmp_path, dataset, file_name, embedded):
    WRITERS[dataset](tmp_path / "root")
    folder_name, title = FOLDERS[dataset]
    path = tmp_path / "root" / folder_name / file_name
    faithful = pickle.loads(path.read_bytes())
    marker = tmp_path / "marker"
    for global_name, payload in payloads(marker).items():
        write_pickle(path, {**faithful, "batch_label": payload} if embedded else payload)
        with pytest.raises(UserError) as raised:
            build_datasets(dataset, tmp_path / "root", train_size=2)
        assert str(raised.value) == (
            f"{path} is not a {title} data file: it asks to load {global_name}, which the format never holds; "
            f"delete it and download it again"
        )
        assert not marker.exists()


def test_the_payload_runs_under_plain_pickle(tmp_path):
    # The control for the test above: the crafted files do run their payload when unpickled normally.
    marker = tmp_path / "marker"
    for payload in payloads(marker).values():
        pickle.loads(pickle.dumps(payload))
        assert marker.exists()
        marker.unlink()


def test_main_exits_2_with_one_line_on_a_crafted_data_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_cifar10(tmp_path / "data")
    marker = tmp_path / "marker"
    write_pickle(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3", payloads(marker)["posix.system"])
    (tmp_path / "tiny.txt").write_text(
        "[experiment]\nname = crafted\ndevice = cpu\ncpu_threads = 1\n[data]\nname = cifar10\ntrain_size = 10\n"
        "[model]\nname = resnet20\n[training]\ntraining_steps = 2\nbatch_size = 2\nevaluate_every_steps = 1\n"
        "[logging]\nprogress_bar = false\n"
    )
    assert main.main(["--config", "tiny.txt"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert "data/cifar-10-batches-py/data_batch_3 is not a CIFAR-10 data file: it asks to load posix.system" in error
    assert not marker.exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


MALFORMED = {
    "not a dictionary": ("cifar10", "data_batch_2", [1, 2, 3], "it holds a list, not a dict"),
    "no labels": ("cifar10", "test_batch", {"data": cifar_batch()["data"]}, "it has no 'labels'"),
    "CIFAR-10 labels in CIFAR-100": ("cifar100", "train", cifar_batch(), "it has no 'fine_labels'"),
    "float pixels": (
        "cifar10", "data_batch_1", {**cifar_batch(), "data": np.zeros((3, 3072))},
        "'data' is a float64 array of shape (3, 3072), not uint8 rows of 3072 bytes",
    ),
    "rows of the wrong length": (
        "cifar100", "test", {**cifar_batch(label_key="fine_labels"), "data": np.zeros((3, 1024), np.uint8)},
        "'data' is a uint8 array of shape (3, 1024)",
    ),
    "pixels as bytes": (
        "cifar10", "data_batch_5", {**cifar_batch(), "data": b"\x00" * 3072}, "'data' is of type bytes, not uint8 rows",
    ),
    "labels as text": ("cifar10", "data_batch_4", {**cifar_batch(), "labels": ["0", "1", "2"]}, "not a list of ints"),
    "labels of booleans": ("cifar10", "data_batch_4", {**cifar_batch(), "labels": [True] * 3}, "not a list of ints"),
    "fewer labels than images": ("cifar10", "data_batch_1", {**cifar_batch(), "labels": [1, 2]}, "3 images, 2 labels"),
    "label out of range": ("cifar10", "test_batch", {**cifar_batch(), "labels": [0, 10, 1]}, "labels outside 0..9"),
    "negative fine label": (
        "cifar100", "train", {**cifar_batch(label_key="fine_labels"), "fine_labels": [0, -1, 1]}, "outside 0..99",
    ),
    "meta without its key": ("cifar10", "batches.meta", {"names": ["cat"] * 10}, "it has no 'label_names'"),
    "meta with too few classes": (
        "cifar100", "meta", {"fine_label_names": ["a"] * 20}, "'fine_label_names' is not a list of 100 class names",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_content_outside_the_format_is_refused_naming_the_file(tmp_path, case):
    dataset, file_name, content, reason = MALFORMED[case]
    WRITERS[dataset](tmp_path)
    folder_name, title = FOLDERS[dataset]
    path = tmp_path / folder_name / file_name
    write_pickle(path, content)
    with pytest.raises(UserError) as raised:
        build_datasets(dataset, tmp_path, train_size=2)
    message = str(raised.value)
    assert message.startswith(f"{path} is not a {title} data file: ") and reason in message
    assert message.endswith("; delete it and download it again") and "\n" not in message


def test_a_file_that_is_no_pickle_of_an_array_is_a_read_error(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x02cnumpy\ndtype\nU\x07garbage\x85R.")
    with pytest.raises(UserError, match=r"cannot read the CIFAR-10 files in .*garbage.*download them again"):
        build_datasets("cifar10", tmp_path, train_size=10)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_faithful_copies_load_with_their_shapes_and_labels(tmp_path, protocol):
    training, test = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    for path in folder.iterdir():  # the same content, written at another protocol
        write_pickle(path, pickle.loads(path.read_bytes()), protocol)
    reader = _CIFAR10Files(tmp_path, train=True)
    assert reader.data.shape == (20, 32, 32, 3) and reader.data.dtype == np.uint8
    assert np.array_equal(reader.data, training.images) and reader.targets == training.labels.tolist()
    assert reader.classes[:3] == ["airplane", "automobile", "bird"] and reader.class_to_idx["truck"] == 9
    test_reader = _CIFAR10Files(tmp_path, train=False)
    assert np.array_equal(test_reader.data, test.images) and test_reader.targets == test.labels.tolist()
    image, label = test_reader[1]
    assert np.array_equal(np.asarray(image), test.images[1]) and label == test.labels[1]


def test_a_batch_in_the_official_python2_format_reads_like_its_copy(tmp_path):
    training, _ = write_cifar10(tmp_path)
    rows = training.images[:4].transpose(0, 3, 1, 2).reshape(4, -1)
    official = python2_cifar_batch(rows, training.labels[:4].tolist())
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(official)
    reader = _CIFAR10Files(tmp_path, train=True)
    assert np.array_equal(reader.data, training.images) and reader.targets == training.labels.tolist()


def test_cifar100_faithful_copy_loads_fine_labels(tmp_path):
    training, test = write_cifar100(tmp_path)
    splits = build_datasets("cifar100", tmp_path, train_size=10)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (10, 2, 5)
    assert [int(label) for _, label in splits.test] == test.labels.tolist()


def test_the_real_cifar10_files_load_through_the_safe_reader():
    if not REAL_CIFAR10.is_dir():
        pytest.skip(f"no real CIFAR-10 files at {REAL_CIFAR10} (data/cifar-10-batches-py in the repository)")
    meta = load_data_pickle(REAL_CIFAR10 / "batches.meta")
    assert meta["label_names"][:2] == ["airplane", "automobile"] and len(meta["label_names"]) == 10
    test = _CIFAR10Files(REAL_CIFAR10.parent, train=False)
    assert test.data.shape == (10000, 32, 32, 3) and test.data.dtype == np.uint8
    assert np.bincount(test.targets).tolist() == [1000] * 10
    assert test.classes == meta["label_names"]
    first = load_data_pickle(REAL_CIFAR10 / "data_batch_1")
    assert first["data"].shape == (10000, 3072) and len(first["labels"]) == 10000
