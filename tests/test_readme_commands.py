"""The README's set-up commands are the ones CI runs, in a fresh virtual environment."""

import pathlib
import re

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    """The indented command lines of the README's Quick start section."""
    text = (REPOSITORY / "README.md").read_text()
    start = text.index("## Quick start\n")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"^    (\S.*)$", section, flags=re.MULTILINE)


def test_readme_test_command_is_one_pip_install_then_pytest():
    test_commands = [line for line in quick_start_commands() if "pytest" in line]
    assert len(test_commands) == 1
    assert re.fullmatch(r"pip install .+ && python -m pytest", test_commands[0])


def test_ci_runs_the_readme_test_command_inside_a_new_virtual_environment():
    (test_command,) = [line for line in quick_start_commands() if "pytest" in line]
    script = [line.strip() for line in (REPOSITORY / ".ci" / "run").read_text().splitlines()]
    assert test_command in script
    venv_line = next(index for index, line in enumerate(script) if re.match(r"python3? -m venv ", line))
    activate_line = next(index for index, line in enumerate(script) if "bin/activate" in line)
    assert venv_line < activate_line < script.index(test_command)


def test_test_requirements_include_the_runner_requirements_and_a_wheel_building_setuptools():
    requirements = (REPOSITORY / "requirements-test.txt").read_text().splitlines()
    assert "-r requirements.txt" in requirements
    assert "pytest" in requirements
    (setuptools,) = [line for line in requirements if line.startswith("setuptools")]
    # 70.1 is the first setuptools that builds wheels without the separate wheel package.
    minimum = tuple(int(part) for part in re.search(r">=([\d.]+)", setuptools).group(1).split("."))
    assert minimum >= (70, 1)
