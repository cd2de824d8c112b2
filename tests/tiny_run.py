"""The tiny LABPAL run on digits that runner tests train, a workspace that holds its configuration,
and the tiny digits comparisons that the comparison, sweep and launcher tests train."""

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


def digits_comparison(name, *, steps, evaluate_every, entries, seeds="0, 1"):
    """A comparison of tiny digits runs as configuration text: the small CNN on one CPU thread,
    batches of 32 (35 steps per epoch), logged every 3 steps; ``entries``: its [[entry]] sections."""
    return f"""\
[experiment]
name = {name}
device = cpu
cpu_threads = 1
[data]
name = digits
[model]
name = small_cnn
[training]
training_steps = {steps}
batch_size = 32
evaluate_every_steps = {evaluate_every}
[logging]
progress_bar = false
log_every_steps = 3
tensorboard = false
[comparison]
seeds = {seeds}
{entries}"""


LABPAL_NSGD_ENTRY = """\
    [[lab_pal]]
    label = LABPAL-NSGD
    optimizer = lab_pal
"""
ADAM_ENTRY = """\
    [[adam]]
    label = Adam
    optimizer = adam
"""
