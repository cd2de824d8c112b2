"""LABPAL: the optimizer, its closure helper and its pure numerical pieces.

Installed on its own as the package ``lab_pal`` (``pip install .``), it imports nothing but
torch and its own modules. ``lab_pal`` holds the optimizer (arguments, state, step), ``steps``
its training updates and measurements, ``research_code`` the research code's steps behind
``LabPal(research_code_steps=True)``, ``numerics`` the numerics as plain functions and
``progress`` its typed counters. ``line_search_base`` holds what LABPAL and the baseline line
searches share (buffers, events, argument checks). Those are imported from their modules, not
exported here.
"""

from .batch_schedule import (
    PAPER_BATCH_SIZE_SCHEDULE,
    multiplier_at,
    noise_adaptation_factor,
    scale_batch_size_schedule,
)
from .closure import MEAN_LOSS, SAMPLE_LOSSES, BatchClosure, make_batch_closure
from .lab_pal import LabPal, LabPalSummary
from .parabola import Parabola, fit_parabola

__all__ = [
    "MEAN_LOSS",
    "PAPER_BATCH_SIZE_SCHEDULE",
    "SAMPLE_LOSSES",
    "BatchClosure",
    "LabPal",
    "LabPalSummary",
    "Parabola",
    "fit_parabola",
    "make_batch_closure",
    "multiplier_at",
    "noise_adaptation_factor",
    "scale_batch_size_schedule",
]
