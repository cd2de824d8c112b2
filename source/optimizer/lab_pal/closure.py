"""Closures that evaluate the loss of one fixed batch, as LABPAL's ``step`` expects."""

from collections.abc import Callable

import torch

MEAN_LOSS = "mean"
"""A closure that returns the batch's mean loss, a 0-dim tensor."""

SAMPLE_LOSSES = "per_sample"
"""A closure that returns one loss per sample, a tensor of shape (b,)."""


class BatchClosure:
    """The loss of one bound batch, forward only, repeatable.

    Calling it evaluates ``loss_function(model(inputs), targets)`` at the model's
    current parameters and returns the loss tensor; it never calls ``backward``.
    The batch is bound when the closure is built and moved to ``device`` only while
    it is evaluated, so a stored closure costs the memory of its batch where the
    caller produced it. Given ``batches`` and ``key`` — any object whose
    ``batches.load(key)`` returns the same (inputs, targets) again, such as a data
    pipeline that names its batches — the closure lets go of its batch after the
    first call and loads it again when it is called later; a stored closure and a
    saved state then hold only the key. The first call records the random-number state (CPU, and
    CUDA when available) and every later call replays it, so dropout masks and any
    other randomness in the forward pass are the same each time; only the first
    call advances the global generators, as an ordinary forward pass would.
    ``outputs`` holds the detached model output of that first (training) call, so a
    trainer gets training accuracy without another forward pass.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        device: torch.device | str | None = None,
        *,
        batches=None,
        key=None,
    ):
        self.model = model
        self.loss_function = loss_function
        self.inputs = inputs
        self.targets = targets
        self.device = torch.device(device) if device is not None else None
        self.batches = batches
        self.key = key
        self.outputs: torch.Tensor | None = None
        self._cpu_rng_state: torch.Tensor | None = None
        self._cuda_rng_state: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self._cpu_rng_state is None:
            self._cpu_rng_state = torch.get_rng_state()
            if self._uses_cuda:
                self._cuda_rng_state = torch.cuda.get_rng_state(self.device)
            loss, outputs = self._evaluate()
            self.outputs = outputs.detach()
            if self.batches is not None:
                self.inputs = self.targets = None
            return loss
        saved_cpu_state = torch.get_rng_state()
        replays_cuda = self._uses_cuda and self._cuda_rng_state is not None
        saved_cuda_state = torch.cuda.get_rng_state(self.device) if replays_cuda else None
        try:
            torch.set_rng_state(self._cpu_rng_state)
            if saved_cuda_state is not None:
                torch.cuda.set_rng_state(self._cuda_rng_state, self.device)
            loss, _ = self._evaluate()
        finally:
            torch.set_rng_state(saved_cpu_state)
            if saved_cuda_state is not None:
                torch.cuda.set_rng_state(saved_cuda_state, self.device)
        return loss

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bound (inputs, targets), loaded again from ``batches`` when the closure let go of them."""
        if self.inputs is None:
            return self.batches.load(self.key)
        return self.inputs, self.targets

    def batch_state(self) -> dict:
        """This closure's batch (or its key) and random state, for a checkpoint."""
        batch = {"key": self.key} if self.batches is not None else {"inputs": self.inputs, "targets": self.targets}
        return {**batch, "cpu_rng_state": self._cpu_rng_state, "cuda_rng_state": self._cuda_rng_state}

    def for_batch(self, batch_state: dict) -> "BatchClosure":
        """A closure over this one's model, loss, device and batches that replays a saved ``batch_state``."""
        if "key" in batch_state:
            if self.batches is None:
                raise ValueError(
                    "the saved state names its batches by key; build the closures with "
                    "make_batch_closure(..., batches=..., key=...) to load them again"
                )
            closure = BatchClosure(
                self.model, self.loss_function, None, None, self.device, batches=self.batches, key=batch_state["key"]
            )
        else:
            closure = BatchClosure(
                self.model, self.loss_function, batch_state["inputs"], batch_state["targets"], self.device
            )
        closure._cpu_rng_state = batch_state["cpu_rng_state"]
        closure._cuda_rng_state = batch_state["cuda_rng_state"]
        return closure

    @property
    def _uses_cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()

    def _evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.batch()
        if self.device is not None:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
        outputs = self.model(inputs)
        return self.loss_function(outputs, targets), outputs


def make_batch_closure(
    model: torch.nn.Module,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    device: torch.device | str | None = None,
    *,
    batches=None,
    key=None,
) -> BatchClosure:
    """Build the closure for ``LabPal.step`` from one batch (``batches``, ``key``: see BatchClosure).

    Build a new closure for every batch: it binds ``inputs`` and ``targets`` now.
    A hand-written ``def closure(): return loss_fn(model(x), y)`` inside a training
    loop reads ``x`` and ``y`` when it is called, and LABPAL calls stored closures
    again several steps later, by when the loop variables hold a newer batch.
    """
    return BatchClosure(model, loss_function, inputs, targets, device, batches=batches, key=key)


def call_forward_only(closure) -> torch.Tensor:
    """``closure()``, with a closure that calls backward under ``no_grad`` named as such."""
    try:
        return closure()
    except RuntimeError as error:
        if "does not require grad" in str(error):
            raise ValueError(forward_only_message("it called backward")) from error
        raise


def forward_only_message(what: str) -> str:
    """The message for a closure that does ``what`` instead of only returning the batch's loss."""
    return (
        f"Invalid closure: {what}; LabPal's closure must only compute and return the batch's loss tensor "
        "(forward only, no zero_grad, no backward, no .item()): LabPal calls backward itself and evaluates "
        "the batch again at other parameters; build it with make_batch_closure(model, loss_function, "
        "inputs, targets, device)"
    )
