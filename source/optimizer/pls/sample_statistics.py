"""One evaluation of a batch for PLS: mean loss and gradient, and the variances of both.

PLS needs, besides f = mean loss and g = mean gradient of a mini-batch of n samples, the variances
of these two means (Mahsereci and Hennig, JMLR 2017, eq. 17):

    f_variance = (mean_i f_i² - f²) / (n - 1)        g_variance = (mean_i g_i² - ḡ²) / (n - 1)

per coordinate, where f_i and g_i are the loss and gradient of sample i (``BATCH_MEAN``). The
research code behind the LABPAL paper's figures used the sample variance of the losses and
(Σ_i g_i² - ḡ²) / (n - 1) instead (``RESEARCH``), n times the paper's and more; it is offered to
reproduce those figures. The mean loss and gradient
come from the ordinary forward and backward pass; the per-sample gradients from a second pass with
``torch.func`` (``vmap`` of ``grad`` over ``functional_call``), which we reduce to the sum of
squared deviations from their mean without keeping more than one chunk of them.

BatchNorm couples the samples of a batch. In the per-sample pass every BatchNorm layer that
normalises with batch statistics normalises with the statistics of the whole batch, captured in
the ordinary forward pass and held constant (the layer runs in eval mode with its running
statistics replaced by them). So g_i is the gradient of sample i's loss with the batch statistics
fixed, and the variance is taken around the mean of these g_i, which then differs from the full
batch gradient ḡ only by the terms through the batch statistics; without BatchNorm the two means
agree and the estimator is exactly the paper's.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..lab_pal import BatchClosure

__all__ = ["BATCH_MEAN", "RESEARCH", "VARIANCE_ESTIMATORS", "BatchEvaluation", "evaluate_batch"]

BATCH_MEAN = "batch_mean"
"""The paper's estimators: the variances of the batch's mean loss and mean gradient."""

RESEARCH = "research"
"""The research code's: the variance of the single losses, and (Σ_i g_i² - ḡ²) / (n - 1)."""

VARIANCE_ESTIMATORS = (BATCH_MEAN, RESEARCH)


class BatchEvaluation(NamedTuple):
    """The mean loss and gradient of one batch and the variances of these means (all detached)."""

    loss: torch.Tensor
    gradient: list[torch.Tensor]
    loss_variance: torch.Tensor
    gradient_variance: list[torch.Tensor]


def evaluate_batch(closure: BatchClosure, params: list[torch.Tensor], sample_chunk_size: int | None = None,
                   variance_estimator: str = BATCH_MEAN) -> BatchEvaluation:
    """Evaluate ``closure`` (per-sample losses) at the current parameters: f, g and their variances.

    ``params`` are the parameters to differentiate (they must belong to ``closure.model``); their
    ``.grad`` is overwritten. ``sample_chunk_size`` bounds how many per-sample gradients exist at
    once (None: the whole batch). ``variance_estimator`` is ``BATCH_MEAN`` or ``RESEARCH``.
    """
    model = closure.model
    with torch.enable_grad(), _batch_norm_statistics(model) as statistics:
        losses = closure()
        if losses.dim() != 1 or losses.shape[0] < 2:
            raise ValueError(
                f"Invalid closure output of shape {tuple(losses.shape)}: PLS needs one loss per sample, "
                "shape (b,) with b >= 2; build the closure with a loss of reduction='none'"
            )
        loss = losses.mean()
        for p in params:
            p.grad = None
        loss.backward()
    losses = losses.detach()
    gradient = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    count = losses.shape[0]
    sample_mean, squared_deviations = _sample_gradient_moments(closure, params, statistics, sample_chunk_size)
    if variance_estimator == RESEARCH:
        loss_variance = torch.var(losses, correction=1)
        # Σ_i g_i² = Σ_i (g_i - mean g)² + n (mean g)²
        gradient_variance = [
            (s + count * m.square() - g.square()) / (count - 1)
            for s, m, g in zip(squared_deviations, sample_mean, gradient)
        ]
    else:
        loss_variance = torch.var(losses, correction=1) / count
        gradient_variance = [s / (count * (count - 1)) for s in squared_deviations]
    return BatchEvaluation(loss.detach(), gradient, loss_variance, gradient_variance)


@contextmanager
def _batch_norm_statistics(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the batch mean and variance that each batch-normalising BatchNorm layer uses, by buffer name."""
    statistics: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            if module.running_mean is None or module.running_var is None:
                raise ValueError(
                    f"Invalid model: BatchNorm layer {name!r} keeps no running statistics "
                    "(track_running_stats=False); PLS's per-sample pass replaces them with the batch statistics"
                )
            handles.append(module.register_forward_pre_hook(partial(_record_statistics, name, statistics)))
    try:
        yield statistics
    finally:
        for handle in handles:
            handle.remove()


def _record_statistics(name: str, statistics: dict, module: nn.Module, inputs: tuple) -> None:
    batch = inputs[0].detach()
    dimensions = [0, *range(2, batch.dim())]
    variance, mean = torch.var_mean(batch, dim=dimensions, correction=0)
    prefix = f"{name}." if name else ""
    statistics[f"{prefix}running_mean"] = mean.to(module.running_mean.dtype)
    statistics[f"{prefix}running_var"] = variance.to(module.running_var.dtype)


def _sample_gradient_moments(closure: BatchClosure, params, statistics, sample_chunk_size
                             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per coordinate the mean of the per-sample gradients g_i and Σ_i (g_i - mean g)², in chunks."""
    model = closure.model
    names = _parameter_names(model, params)
    constants = {name: tensor.detach() for name, tensor in model.named_parameters() if name not in names.values()}
    constants.update({name: tensor for name, tensor in model.named_buffers()})
    constants.update(statistics)
    trainable = {names[id(p)]: p.detach() for p in params}
    inputs, targets = closure.batch()
    if closure.device is not None:
        inputs, targets = inputs.to(closure.device), targets.to(closure.device)

    def sample_loss(trainable, sample_input, sample_target):
        outputs = functional_call(model, {**constants, **trainable}, (sample_input.unsqueeze(0),))
        return closure.loss_function(outputs, sample_target.unsqueeze(0)).sum()

    per_sample_gradients = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
    sample_count = inputs.shape[0]
    chunk = sample_count if sample_chunk_size is None else sample_chunk_size
    count, mean, squared_deviations = 0, None, None
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    # Eval mode makes the BatchNorm layers normalise with the captured batch statistics (held constant);
    # the forked generator keeps dropout draws of this pass out of the training's random stream.
    with torch.random.fork_rng(devices=devices), _eval_mode(batch_norms):
        for start in range(0, sample_count, chunk):
            gradients = per_sample_gradients(trainable, inputs[start:start + chunk], targets[start:start + chunk])
            chunk_count = gradients[names[id(params[0])]].shape[0]
            chunk_mean = [gradients[names[id(p)]].mean(dim=0) for p in params]
            chunk_squares = [
                (gradients[names[id(p)]] - m).square().sum(dim=0) for p, m in zip(params, chunk_mean)
            ]
            del gradients
            if mean is None:
                count, mean, squared_deviations = chunk_count, chunk_mean, chunk_squares
                continue
            # Chan et al.'s pairwise update of mean and sum of squared deviations.
            total = count + chunk_count
            for m, s, cm, cs in zip(mean, squared_deviations, chunk_mean, chunk_squares):
                delta = cm - m
                m.add_(delta, alpha=chunk_count / total)
                s.add_(cs).add_(delta.square(), alpha=count * chunk_count / total)
            count = total
    return mean, squared_deviations


def _parameter_names(model: nn.Module, params) -> dict[int, str]:
    by_identity = {id(tensor): name for name, tensor in model.named_parameters()}
    missing = [tuple(p.shape) for p in params if id(p) not in by_identity]
    if missing:
        raise ValueError(
            f"Invalid parameters: tensors of shapes {missing} are not parameters of the closure's model; "
            "PLS differentiates the closure's model per sample"
        )
    return {id(p): by_identity[id(p)] for p in params}


@contextmanager
def _eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    for module in modules:
        module.train(False)
    try:
        yield
    finally:
        for module in modules:
            module.train(True)
