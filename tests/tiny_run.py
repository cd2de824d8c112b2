"""The tiny LABPAL run on digits that runner tests train, and a workspace that holds its configuration."""

import io

import pytest
from configobj import ConfigObj

# 1,150 digits training images / 32 = 35 steps per epoch; evaluations at 10, 20, 24.
TINY = """\
[experiment]
name = tiny
device = cpu
cpu_threads = 1
[data]
name = digits
[model]
name = small_cnn
[optimizer]
name = lab_pal
[training]
training_steps = 24
batch_size = 32
evaluate_every_steps = 10
[logging]
progress_bar = false
log_every_steps = 5
"""


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A fresh working folder holding tiny.txt; runs/ and plots/ are created inside it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(TINY)
    return tmp_path


def set_options(*overrides):
    """Command-line arguments that apply ``overrides`` ("section.key=value") with --set."""
    return [argument for override in overrides for argument in ("--set", override)]


def tiny_with(changes):
    """TINY with ``changes`` ({section: {key: value or {subsection}}}) merged in, as configuration text."""
    configuration = ConfigObj(TINY.splitlines(), interpolation=False)
    configuration.merge(changes)
    text = io.BytesIO()
    configuration.write(text)
    return text.getvalue().decode()
