"""The step-based training loop: train, log, evaluate, checkpoint, and test the best checkpoint.

As in the paper, a run is a number of training steps of one inference batch (size b) each; an
epoch is floor(N_train / b) steps. The validation split is evaluated every
``evaluate_every_steps`` (default: every epoch) and at the end; the checkpoint with the best
validation accuracy (lowest RMSE for regression; ties go to the lower validation loss, which
matters on small validation sets that many checkpoints classify perfectly) is kept, and at the
end it is evaluated on the test split.

Optimizers come in two kinds. Line searches (``source.optimizer.LineSearch``: LABPAL, PAL, SLS,
GOLS-I, PLS) get a forward-only closure over the CPU batch and do everything else; the trainer
reads the training outputs from ``closure.outputs``, their numbers from ``log_values()`` at log
intervals and their measurements and failures from ``take_events()`` after every step. Plain
torch.optim optimizers get zero_grad, forward, backward, step, and then the schedule steps once
per training step; they make one forward and one backward pass per step.
"""

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass

from tqdm import tqdm

from source.optimizer import make_batch_closure
from source.training.checkpoints import capture_random_state, load_checkpoint, restore_random_state, save_atomically
from source.training.data_order import evaluation_loader, training_loader
from source.training.evaluation import RunningMetrics, evaluate, quality_metric
from source.training.losses import with_reduction
from source.training.metrics_log import MetricsLog

__all__ = ["RunOutcome", "Trainer"]


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: at which step, whether it finished, and its test result."""

    step: int
    finished: bool
    test: dict | None
    best_step: int | None
    best_validation: dict | None


def say(message):
    """Print a progress message to the terminal without breaking the progress bar."""
    tqdm.write(message, file=sys.stdout)


def _format_metrics(metrics):
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())


class Trainer:
    """Trains one experiment in its run folder, from step 0 or from a checkpoint's state.

    ``checkpoint`` is the content of last.pt to continue from. ``resume`` continues the folder's
    metrics file and event files (after the checkpoint's step; from step 0 without a checkpoint)
    instead of starting them.
    """

    def __init__(self, experiment, run_folder, checkpoint=None, *, resume=False):
        configuration = experiment.configuration
        self.experiment = experiment
        self.run_folder = run_folder
        self.training = configuration["training"]
        self.logging = configuration["logging"]
        splits, device = experiment.splits, experiment.device
        data = configuration["data"]
        # Pinned host memory makes the copies to the GPU asynchronous.
        loader_options = dict(num_workers=data["num_workers"], pin_memory=device.type == "cuda")
        self.training_loader, self.sampler = training_loader(
            splits.train, self.training["batch_size"], configuration["experiment"]["seed"], **loader_options
        )
        self.validation_loader = evaluation_loader(
            splits.validation, self.training["evaluation_batch_size"], **loader_options
        )
        self.test_loader = evaluation_loader(splits.test, self.training["evaluation_batch_size"], **loader_options)
        # Training metrics since the last training record, and since the last evaluation.
        self.window = RunningMetrics(splits.task, splits.target_scale, device)
        self.interval = RunningMetrics(splits.task, splits.target_scale, device)
        self.evaluation = RunningMetrics(splits.task, splits.target_scale, device)
        self.quality, self.higher_is_better = quality_metric(splits.task)
        self.step = 0
        self.steps_this_session = 0
        self.best = None
        self.finished = False
        self.test = None
        self.elapsed_before = 0.0
        self.stop_requested = False
        self._checkpointed_step = None
        resume_offset, resume_step = 0, (0 if resume else None)
        if checkpoint is not None:
            resume_offset, resume_step = checkpoint["metrics_offset"], checkpoint["step"]
        self.log = MetricsLog(
            run_folder.path,
            run_folder.metrics_path,
            tensorboard=self.logging["tensorboard"],
            resume_offset=resume_offset,
            resume_step=resume_step,
        )
        if checkpoint is not None:
            self._restore(checkpoint)
        self._session_start = time.perf_counter()

    # ------------------------------------------------------------------ the loop

    def train(self, stop_after_steps=None):
        """Train to ``training_steps`` (or ``stop_after_steps`` more steps), then test; return the outcome.

        Stopping early (``stop_after_steps``, Ctrl-C or SIGTERM) saves the last checkpoint at the
        step reached, so --resume continues exactly there.
        """
        total = self.training["training_steps"]
        if self.finished and self.step == total:
            say(f"{self.run_folder.path} finished at step {self.step} already; nothing to train")
            return self.outcome()
        self.finished, self.test = False, None
        stop_at = total if stop_after_steps is None else min(total, self.step + stop_after_steps)
        steps_per_epoch = self.experiment.steps_per_epoch
        batch_size = self.training["batch_size"]
        self.experiment.model.train()
        with self._progress_bar(total) as bar, self._stop_on_signals():
            while self.step < stop_at and not self.stop_requested:
                epoch, batch_in_epoch = divmod(self.step, steps_per_epoch)
                self.sampler.set_position(epoch, batch_in_epoch * batch_size)
                for inputs, targets in self.training_loader:
                    self._train_step(inputs, targets, bar)
                    if self.step >= stop_at or self.stop_requested:
                        break
        if self.step < total:
            if self._checkpointed_step != self.step:
                self._save_last_checkpoint()
            say(f"stopped at step {self.step} of {total}; continue with --resume")
        else:
            self._test_best_checkpoint()
        self.log.flush()
        return self.outcome()

    def _train_step(self, inputs, targets, bar):
        experiment = self.experiment
        log_now = (self.step + 1) % self.logging["log_every_steps"] == 0
        loss, outputs, targets = self._optimize(inputs, targets)
        # What this step used, read before a schedule moves the learning rate on for the next step.
        optimizer_values = self._optimizer_values(self.step + 1) if log_now else None
        if experiment.schedule is not None:
            experiment.schedule.step()
        self.window.add(loss, outputs, targets)
        self.interval.add(loss, outputs, targets)
        self.step += 1
        self.steps_this_session += 1
        bar.update()
        if experiment.is_line_search:
            self._log_events(experiment.optimizer.take_events())
        if log_now:
            self._log_training(optimizer_values, bar)
        if self.step % experiment.evaluate_every_steps == 0 or self.step == self.training["training_steps"]:
            self._evaluate_and_checkpoint()

    def _optimize(self, inputs, targets):
        """One optimizer step on one batch; returns the batch's loss, model outputs and device targets."""
        experiment = self.experiment
        model, optimizer, device = experiment.model, experiment.optimizer, experiment.device
        if experiment.is_line_search:
            # The closure moves the CPU batch to the device itself, each time it is evaluated.
            loss_function = with_reduction(experiment.loss_function, optimizer.closure_loss)
            closure = make_batch_closure(model, loss_function, inputs, targets, device)
            loss = optimizer.step(closure)
            return loss, closure.outputs, targets.to(device, non_blocking=True)
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        outputs = model(inputs)
        loss = experiment.loss_function(outputs, targets)
        loss.backward()
        optimizer.step()
        return loss.detach(), outputs.detach(), targets

    # ------------------------------------------------------------------ logging and evaluation

    def _optimizer_values(self, steps_done):
        """The optimizer's numbers after ``steps_done`` steps: learning rate, training batch size, passes, ….

        A line search reports its own (a learning rate of 0 before it has chosen one, and the
        inference batch size unless it trains on larger batches, as LABPAL does); a plain optimizer
        runs on the schedule's learning rate with one forward and backward pass a step.
        """
        optimizer = self.experiment.optimizer
        if self.experiment.is_line_search:
            return {"learning_rate": 0.0, "training_batch_size": self.training["batch_size"], **optimizer.log_values()}
        return {
            "learning_rate": float(optimizer.param_groups[0]["lr"]),
            "training_batch_size": self.training["batch_size"],
            "forward_passes": steps_done,
            "backward_passes": steps_done,
        }

    def _log_training(self, optimizer_values, bar):
        metrics = self.window.result()
        self.window.reset()
        self.log.write(self.step, "training", {**metrics, **optimizer_values})
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{optimizer_values['learning_rate']:.3g}", refresh=False)

    def _log_events(self, events):
        """Record a line search's measurements and failures; print the reason of each failure."""
        for event in events:
            self.log.write_event(self.step, event)
            if event["event"] == "failure":
                say(f"step {self.step}: {event['reason']}")

    def _evaluate_and_checkpoint(self):
        experiment = self.experiment
        validation = evaluate(
            experiment.model, self.validation_loader, experiment.loss_function, self.evaluation, experiment.device
        )
        epoch = self.step / experiment.steps_per_epoch
        elapsed = self._elapsed()
        self.log.write(
            self.step, "validation", validation, {"epoch": round(epoch, 4), "elapsed_seconds": round(elapsed, 3)}
        )
        training = self.interval.result()
        self.interval.reset()
        learning_rate = self._optimizer_values(self.step)["learning_rate"]
        say(
            f"step {self.step}/{self.training['training_steps']} epoch {epoch:.4g} | "
            f"training {_format_metrics(training)} | validation {_format_metrics(validation)} | "
            f"lr {learning_rate:.4g} | {elapsed:.1f} s"
        )
        if self._is_better(validation):
            self.best = {"step": self.step, "validation": validation}
            save_atomically(
                {"step": self.step, "model": experiment.model.state_dict(), "validation": validation},
                self.run_folder.best_checkpoint_path,
            )
        self._save_last_checkpoint()
        self.log.flush()

    def _is_better(self, validation):
        """Better validation accuracy (lower RMSE); on a tie, lower validation loss."""
        if self.best is None:
            return True
        new, old = validation[self.quality], self.best["validation"][self.quality]
        if math.isnan(new):
            return False
        if new != old:
            return (new > old) == self.higher_is_better
        return validation["loss"] < self.best["validation"]["loss"]

    def _test_best_checkpoint(self):
        """Evaluate the best validation checkpoint on the test split (the paper's protocol)."""
        experiment = self.experiment
        best = load_checkpoint(self.run_folder.best_checkpoint_path)
        experiment.model.load_state_dict(best["model"])
        self.test = evaluate(
            experiment.model, self.test_loader, experiment.loss_function, self.evaluation, experiment.device
        )
        passes = self._optimizer_values(self.step)
        self.log.write(
            self.step,
            "test",
            self.test,
            {
                "best_step": best["step"],
                "elapsed_seconds": round(self._elapsed(), 3),
                "forward_passes": passes["forward_passes"],
                "backward_passes": passes["backward_passes"],
            },
        )
        say(
            f"test {_format_metrics(self.test)} with the checkpoint of step {best['step']} "
            f"(best validation {self.quality} {best['validation'][self.quality]:.4f})"
        )
        # Put the final weights back and record that the run is complete.
        last = load_checkpoint(self.run_folder.last_checkpoint_path)
        experiment.model.load_state_dict(last["model"])
        self.finished = True
        last.update(finished=True, test=self.test, metrics_offset=self.log.offset())
        save_atomically(last, self.run_folder.last_checkpoint_path)

    # ------------------------------------------------------------------ checkpoints

    def _save_last_checkpoint(self):
        experiment = self.experiment
        state = {
            "step": self.step,
            "model": experiment.model.state_dict(),
            "optimizer": experiment.optimizer.state_dict(),
            "schedule": experiment.schedule.state_dict() if experiment.schedule is not None else None,
            "random_state": capture_random_state(),
            "best": self.best,
            "training_window": self.window.state_dict(),
            "evaluation_interval": self.interval.state_dict(),
            "metrics_offset": self.log.offset(),
            "elapsed_seconds": self._elapsed(),
            "finished": self.finished,
            "test": self.test,
        }
        save_atomically(state, self.run_folder.last_checkpoint_path)
        self._checkpointed_step = self.step

    def _restore(self, checkpoint):
        experiment = self.experiment
        experiment.model.load_state_dict(checkpoint["model"])
        experiment.optimizer.load_state_dict(checkpoint["optimizer"])
        if experiment.schedule is not None:
            experiment.schedule.load_state_dict(checkpoint["schedule"])
        self.step = checkpoint["step"]
        self.best = checkpoint["best"]
        self.window.load_state_dict(checkpoint["training_window"])
        self.interval.load_state_dict(checkpoint["evaluation_interval"])
        self.elapsed_before = checkpoint["elapsed_seconds"]
        self.finished = checkpoint["finished"]
        self.test = checkpoint["test"]
        self._checkpointed_step = self.step
        # Last, so that nothing built above draws from the restored generators.
        restore_random_state(checkpoint["random_state"])

    # ------------------------------------------------------------------ helpers

    def _elapsed(self):
        return self.elapsed_before + time.perf_counter() - self._session_start

    def outcome(self):
        """The run's state now, as a ``RunOutcome``."""
        return RunOutcome(
            step=self.step,
            finished=self.finished,
            test=self.test,
            best_step=self.best["step"] if self.best else None,
            best_validation=self.best["validation"] if self.best else None,
        )

    def close(self):
        """Close the metrics file and the TensorBoard writer."""
        self.log.close()

    def _progress_bar(self, total):
        return tqdm(
            total=total,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not self.logging["progress_bar"],
            file=sys.stderr,
        )

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """Ctrl-C or SIGTERM: finish the current step, save a checkpoint, stop; a second one aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {number: signal.getsignal(number) for number in signals}

        def request_stop(number, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            say("stopping after this step and saving a checkpoint (again to abort at once)")

        for number in signals:
            signal.signal(number, request_stop)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
