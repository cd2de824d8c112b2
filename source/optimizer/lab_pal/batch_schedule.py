"""The batch-size schedule of LABPAL, scaled by the noise adaptation factor."""

import bisect
from collections.abc import Sequence

#: Reference setting of the paper: CIFAR-10's 40,000 training images with inference batches of 128.
REFERENCE_TRAINING_SET_SIZE = 40_000
REFERENCE_INFERENCE_BATCH_SIZE = 128

#: The paper's schedule: (step, training-batch multiplier k), steps counting inference batches.
PAPER_BATCH_SIZE_SCHEDULE = ((0, 1), (75_000, 2), (112_500, 4))


def noise_adaptation_factor(training_set_size: int, inference_batch_size: int) -> float:
    """``f = (128 / b) * (N / 40000)``: how much noisier the gradients are than in the reference setting.

    Smaller batches and larger data sets raise the gradient noise; LABPAL answers with
    proportionally larger training batches.
    """
    if training_set_size < 1:
        raise ValueError(f"Invalid training_set_size: {training_set_size}; it must be >= 1")
    if inference_batch_size < 1:
        raise ValueError(f"Invalid inference_batch_size: {inference_batch_size}; it must be >= 1")
    return (REFERENCE_INFERENCE_BATCH_SIZE / inference_batch_size) * (
        training_set_size / REFERENCE_TRAINING_SET_SIZE
    )


def scale_batch_size_schedule(
    schedule: Sequence[tuple[int, int]], factor: float
) -> tuple[tuple[int, int], ...]:
    """Multiply every multiplier of ``schedule`` by ``factor``, as ``max(int(k * factor), 1)``."""
    return tuple((int(step), max(int(multiplier * factor), 1)) for step, multiplier in schedule)


def validate_batch_size_schedule(
    schedule: Sequence[tuple[int, int]] | Sequence[str] | str,
) -> tuple[tuple[int, int], ...]:
    """Return ``schedule`` as a tuple of (step, multiplier) pairs, or raise ValueError naming the problem.

    Besides pairs, the written form of configuration files is accepted: "step:multiplier" items,
    as a list or one comma-separated text, e.g. ``"0:1, 75000:2, 112500:4"``.
    """
    items = schedule.split(",") if isinstance(schedule, str) else schedule
    try:
        pairs = tuple(
            (int(step), int(multiplier))
            for step, multiplier in (item.split(":") if isinstance(item, str) else item for item in items)
        )
    except (TypeError, ValueError):
        raise ValueError(
            f"Invalid batch_size_schedule: {schedule!r}; expected (step, multiplier) pairs such as "
            f"{PAPER_BATCH_SIZE_SCHEDULE}, or the text \"0:1, 75000:2, 112500:4\""
        ) from None
    steps = [step for step, _ in pairs]
    if not pairs or steps[0] != 0 or any(a >= b for a, b in zip(steps, steps[1:])):
        raise ValueError(
            f"Invalid batch_size_schedule: {schedule!r}; it must start at step 0 with strictly increasing steps"
        )
    if any(multiplier < 1 for _, multiplier in pairs):
        raise ValueError(f"Invalid batch_size_schedule: {schedule!r}; every multiplier must be >= 1")
    return pairs


def multiplier_at(schedule: Sequence[tuple[int, int]], step: int) -> int:
    """The training-batch multiplier k that ``schedule`` prescribes at ``step`` (inference batches)."""
    index = bisect.bisect_right([start for start, _ in schedule], step) - 1
    return schedule[max(index, 0)][1]
