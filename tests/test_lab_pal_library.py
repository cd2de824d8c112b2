"""LABPAL as a library: installed with pip, imported as ``lab_pal`` from anywhere, the README example run."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE_HEADING = "Use LABPAL in your own training loop"


def readme_example() -> str:
    """The first python code block under the README's own-loop heading: the one source of the example."""
    text = (REPOSITORY / "README.md").read_text()
    start = text.index(f"## {EXAMPLE_HEADING}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start : end if end != -1 else None], flags=re.DOTALL)
    assert blocks, f"no python code block under ## {EXAMPLE_HEADING}"
    return blocks[0]


def project_copy(tmp_path) -> pathlib.Path:
    """What the build reads, copied, so that build/ and *.egg-info never land in the repository."""
    pytest.importorskip("setuptools", reason="building the package needs setuptools (pip install -r requirements-test.txt)")
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, copy / name)
    shutil.copytree(
        REPOSITORY / "source" / "optimizer" / "lab_pal",
        copy / "source" / "optimizer" / "lab_pal",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return copy


def run_python(python, arguments, cwd, python_path=None, timeout=300):
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["OMP_NUM_THREADS"] = "1"
    if python_path is not None:
        environment["PYTHONPATH"] = str(python_path)
    return subprocess.run(
        [str(python), *arguments], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def pip_install(python, arguments, cwd):
    result = run_python(python, ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                                 "--disable-pip-version-check", *arguments], cwd)
    assert result.returncode == 0, result.stdout + result.stderr


def test_installed_package_holds_only_lab_pal_and_runs_the_readme_example_from_anywhere(tmp_path):
    copy = project_copy(tmp_path)
    target = tmp_path / "installed"
    pip_install(sys.executable, ["--target", str(target), "."], cwd=copy)
    top_level = sorted(path.name for path in target.iterdir())
    assert top_level[0] == "lab_pal" and len(top_level) == 2 and top_level[1].startswith("lab_pal-0.1.0.dist-info")
    # The runner's code stays out of the package, and the package needs none of it.
    assert "source" not in (target / top_level[1] / "top_level.txt").read_text()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = run_python(sys.executable, ["-c", "import lab_pal, sys; print(lab_pal.__file__); import source"],
                       cwd=elsewhere, python_path=target)
    assert found.stdout.startswith(str(target / "lab_pal")), found.stderr
    assert "No module named 'source'" in found.stderr

    example = readme_example()
    assert "from lab_pal import" in example, "the README's own-loop example must import the installed lab_pal"
    (elsewhere / "example.py").write_text(example)
    result = run_python(sys.executable, ["example.py"], cwd=elsewhere, python_path=target)
    assert result.returncode == 0, result.stderr
    assert "epoch 2:" in result.stdout
    measurements = re.search(r"measurements=(\d+), failed_measurements=(\d+)", result.stdout)
    assert int(measurements.group(1)) >= 1
    accuracy = float(re.search(r"training accuracy ([0-9.]+)", result.stdout).group(1))
    assert accuracy >= 0.9  # 0.960 with its seed on one CPU thread


def environment_over_this_one(path) -> pathlib.Path:
    """A throwaway venv that sees this interpreter's packages (torch, setuptools, pip) but installs nothing into them.

    ``system_site_packages`` would show the base interpreter's packages instead, which inside a
    virtual environment are not the ones the test command installed.
    """
    venv.EnvBuilder(with_pip=False).create(path)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    inner_site_packages = run_python(python, ["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     cwd=path).stdout.strip()
    outer_site_packages = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    (pathlib.Path(inner_site_packages) / "outer_environment.pth").write_text("\n".join(sorted(outer_site_packages)) + "\n")
    return python


def test_editable_install_maps_lab_pal_to_the_source_folder(tmp_path):
    copy = project_copy(tmp_path)
    python = environment_over_this_one(tmp_path / "venv")
    pip_install(python, ["-e", "."], cwd=copy)
    found = run_python(python, ["-c", "from lab_pal import LabPal, make_batch_closure; import lab_pal; "
                                      "print(lab_pal.__file__)"], cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(copy / "source" / "optimizer" / "lab_pal" / "__init__.py")
