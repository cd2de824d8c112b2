"""Loss and accuracy (classification) or RMSE (regression) over batches, and split evaluation.

Metric names: "loss" (the training loss function's mean), and "accuracy" for classification or
"rmse" for regression. RMSE is in the data set's own units: the targets are standardised, so the
RMSE of the standardised targets is multiplied by the data set's ``target_scale``.
"""

import math

import torch

from source.quality_metric import quality_metric

__all__ = ["RunningMetrics", "evaluate"]


class RunningMetrics:
    """Sums of loss and correct predictions (or squared errors) over the batches added so far.

    The sums stay on the device, so ``add`` never waits for the accelerator; ``result`` does.
    """

    def __init__(self, task, target_scale, device):
        self.task = task
        self.target_scale = target_scale
        self.device = device
        self.reset()

    def reset(self):
        """Start a new window: forget every batch added so far."""
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.quality_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.samples = 0
        self.values = 0

    def add(self, loss, outputs, targets):
        """Add one batch: ``loss`` is its mean loss, ``outputs`` the model's output for it."""
        batch = targets.shape[0]
        self.loss_sum += loss.detach().double() * batch
        if self.task == "classification":
            self.quality_sum += (outputs.argmax(dim=1) == targets).sum()
        else:
            self.quality_sum += (outputs.detach().double() - targets.double()).square().sum()
        self.samples += batch
        self.values += targets.numel()

    def result(self, distributed=None):
        """Mean loss and accuracy (or RMSE in data units) of the batches added; {} when none.

        With ``distributed`` (every process calls it) the sums of all processes are combined.
        """
        counts = torch.tensor([self.samples, self.values], dtype=torch.float64, device=self.device)
        sums = torch.cat([self.loss_sum.view(1), self.quality_sum.view(1), counts])
        if distributed is not None:
            distributed.sum_tensors([sums])
        loss_sum, quality_sum, samples, values = sums.tolist()
        if not samples:
            return {}
        name = quality_metric(self.task).name
        if self.task == "classification":
            return {"loss": loss_sum / samples, name: quality_sum / samples}
        return {"loss": loss_sum / samples, name: math.sqrt(quality_sum / values) * self.target_scale}

    def state_dict(self):
        """The sums, for a checkpoint taken in the middle of a window."""
        return {
            "loss_sum": self.loss_sum,
            "quality_sum": self.quality_sum,
            "samples": self.samples,
            "values": self.values,
        }

    def load_state_dict(self, state):
        """Continue the window saved by ``state_dict``."""
        self.loss_sum = state["loss_sum"].to(self.device)
        self.quality_sum = state["quality_sum"].to(self.device)
        self.samples = state["samples"]
        self.values = state["values"]


def evaluate(network, model, batches, loss_function, metrics, distributed=None):
    """Mean loss and accuracy (or RMSE) of ``network`` over ``batches``, in eval mode, without gradients.

    ``network`` computes the outputs: ``model`` or its compiled wrapper. ``batches`` yields
    (inputs, targets) on the model's device. ``metrics`` is a ``RunningMetrics`` for the task; it is
    reset first. The model's train/eval mode is restored afterwards. With ``distributed``, each
    process evaluates its share and the result is over all of them.
    """
    was_training = model.training
    model.eval()
    metrics.reset()
    with torch.no_grad():
        for inputs, targets in batches:
            outputs = network(inputs)
            metrics.add(loss_function(outputs, targets), outputs, targets)
    model.train(was_training)
    return metrics.result(distributed)
