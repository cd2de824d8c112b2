"""LABPAL's counters and running values between steps: one typed record, saved under ``"lab_pal"``."""

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

__all__ = ["MEASURING", "TRAINING", "LabPalProgress"]

MEASURING = "measuring"
TRAINING = "training"

# Entries of the saved record that live outside it: the closures of a measurement's direction
# batches (saved as their batches) and the device-side count of skipped updates (saved as an int).
_SAVED_ELSEWHERE = ("pending_batches", "skipped_updates")


@dataclass
class LabPalProgress:
    """Where LABPAL stands: phase, counters, the values in use and the measurement being gathered.

    Steps count inference batches, updates count parameter updates. Tensors stay on the
    parameters' device, so that training never waits for the host.
    """

    research_step_cap: float  # the research code's clipping cap: max_step at first
    phase: str = MEASURING
    steps: int = 0
    updates: int = 0
    multiplier: int = 1
    measurement_batches: int = 0
    training_batches: int = 0
    next_measurement_update: int = 0
    step_size: float | None = None
    learning_rate: float | None = None
    effective_learning_rate: torch.Tensor | None = None
    last_measured_step: float | None = None
    last_measured_learning_rate: float | None = None
    step_size_history: list[float] = field(default_factory=list)
    learning_rate_history: list[float] = field(default_factory=list)
    measurements: int = 0
    failed_measurements: int = 0
    last_failure: str | None = None
    direction_norm: float | None = None
    line_penalty: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    line_losses: torch.Tensor | None = None
    research_origin_loss: torch.Tensor | None = None
    research_line_losses: list[list[float]] = field(default_factory=lambda: [[], []])
    training_loss_sum: torch.Tensor | None = None
    forward_passes: int = 0
    backward_passes: int = 0
    last_measurement_step: int = 0
    schedule_position: int = 0
    skipped_updates: torch.Tensor | None = None  # counted on the device

    def at_update_boundary(self) -> bool:
        """Whether no training batch or measurement is partly gathered."""
        if self.phase == MEASURING:
            return self.measurement_batches == 0
        return self.training_batches == 0

    def count_skipped(self, found_non_finite: torch.Tensor) -> None:
        """Add ``found_non_finite`` (0 or 1, on the device) to the skipped updates."""
        if self.skipped_updates is None:
            self.skipped_updates = torch.zeros((), device=found_non_finite.device, dtype=torch.float32)
        self.skipped_updates += found_non_finite

    def skipped_update_count(self) -> int:
        """The skipped updates as an int (waits for the device)."""
        return 0 if self.skipped_updates is None else int(self.skipped_updates.item())

    def to_dict(self) -> dict:
        """The record as saved: plain values and cloned tensors, skipped updates as an int."""
        saved = {
            entry.name: _copied(getattr(self, entry.name))
            for entry in dataclasses.fields(self)
            if entry.name != "skipped_updates"
        }
        saved["skipped_updates"] = self.skipped_update_count()
        return saved

    @classmethod
    def from_dict(cls, saved: dict, max_step: float, device: torch.device) -> "LabPalProgress":
        """The record saved by :meth:`to_dict`, its tensors on ``device``.

        Entries that older versions did not save take their initial values. ``pending_batches``
        is left to the caller.
        """
        names = {entry.name for entry in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - names - set(_SAVED_ELSEWHERE))
        if unknown:
            raise ValueError(
                f"Invalid LabPal state: unknown entries {', '.join(unknown)}; load a state saved by LabPal.state_dict"
            )
        values = {name: value for name, value in saved.items() if name in names and name != "skipped_updates"}
        progress = cls(**{"research_step_cap": max_step, **values})
        progress.step_size_history = list(progress.step_size_history)
        progress.learning_rate_history = list(progress.learning_rate_history)
        for name in ("line_losses", "training_loss_sum", "effective_learning_rate", "research_origin_loss"):
            value = getattr(progress, name)
            if isinstance(value, torch.Tensor):
                setattr(progress, name, value.to(device))
        if saved.get("skipped_updates"):
            progress.count_skipped(torch.tensor(float(saved["skipped_updates"]), device=device))
        return progress


def _copied(value):
    return value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
