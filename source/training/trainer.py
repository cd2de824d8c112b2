"""The step-based training loop: train, log, evaluate, checkpoint, and test the best checkpoint.

As in the paper, a run is a number of training steps of one inference batch (size b) each; an
epoch is floor(N_train / b) steps. The validation split is evaluated every
``evaluate_every_steps`` (default: every epoch) and at the end; the checkpoint with the best
validation accuracy (lowest RMSE for regression; ties go to the lower validation loss, which
matters on small validation sets that many checkpoints classify perfectly) is kept, and at the
end it is evaluated on the test split.

The trainer takes its batches from the experiment's data pipelines (source.data) and its
settings from ``experiment.settings``; it does not read the configuration. Its training step never
waits for the device: losses, metrics and the divergence streak stay there until a log interval.

The trainer knows no optimizer by kind: the experiment's stepper (source/optimizer/steppers.py)
performs each training step, optimizer and schedule together, and reports the optimizer's
numbers at log intervals and its measurements and failures after every step.

In several processes (torchrun) every process runs this loop on its share of each batch. Only
rank 0 writes the metrics, event files and checkpoints and prints; training and evaluation
metrics are summed across processes before they are logged; BatchNorm statistics are averaged
before every evaluation and checkpoint; a stop request or a divergence on any process is agreed
on at the next log interval, and a checkpoint is written only where the optimizer holds no partial
sums of a training batch (``holds_partial_sums``), so every process resumes from rank 0's state.

A run diverges when its training loss is not finite (or, with ``divergence_loss_factor``, above
that factor times the first logged training loss) for ``divergence_steps`` consecutive steps; it
then stops with a "diverged" record in metrics.jsonl, keeps its last good checkpoint and is not
tested. No checkpoint ever holds a non-finite parameter or buffer, and a non-finite validation
result never becomes the best checkpoint.
"""

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time

import torch
from tqdm import tqdm

from source.errors import UserError
from source.quality_metric import quality_metric
from source.training.checkpoints import (
    capture_random_state,
    non_finite_entry,
    read_checkpoint,
    restore_random_state,
    save_checkpoint,
)
from source.training.evaluation import RunningMetrics, evaluate
from source.training.metrics_log import MetricsLog
from source.training.run_state import BEST_KEYS, RunState

__all__ = ["Aborted", "DivergenceWatch", "Trainer", "initial_loop_states"]


class Aborted(KeyboardInterrupt):
    """A SIGINT or SIGTERM that stops at once, without saving: a second one in the training loop, or
    one anywhere else (start-up, the test, the figures); exit status 128 + the signal number."""

    def __init__(self, signal_number):
        super().__init__(f"aborted by signal {signal_number}")
        self.signal_number = signal_number


class DivergenceWatch:
    """Counts, on the device, the consecutive training steps whose loss is not finite or blew up.

    ``add`` never waits for the device (no ``.item()``): the streak, the step at which it first
    reached ``steps`` and the loss there are 0-dim tensors updated with ``torch.where``. The
    trainer reads them with ``diverged_step`` at log intervals and evaluations, where it
    synchronises anyway. The step is latched, so a streak that ends between two checks is still
    caught. ``loss_factor`` (None: off) also counts a loss above that factor times the first logged
    training loss (``set_reference``).
    """

    def __init__(self, steps, loss_factor, device):
        self.steps = steps
        self.loss_factor = loss_factor
        self.reference_loss = None
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.diverged_at = torch.zeros((), dtype=torch.int64, device=device)
        self.loss_at = torch.zeros((), dtype=torch.float64, device=device)

    def set_reference(self, loss):
        """Take the first logged training loss (a float) as the reference of the blow-up test."""
        if self.loss_factor is not None and self.reference_loss is None and math.isfinite(loss) and loss > 0:
            self.reference_loss = loss

    def add(self, loss, step):
        """Count training step ``step`` (from 1) with mean loss ``loss`` (a tensor), on its device."""
        loss = loss.detach().to(self.streak.device, torch.float64)
        bad = ~torch.isfinite(loss)
        if self.reference_loss is not None:
            bad = bad | (loss > self.loss_factor * self.reference_loss)
        self.streak = torch.where(bad, self.streak + 1, 0)
        first = (self.streak == self.steps) & (self.diverged_at == 0)
        self.diverged_at = torch.where(first, step, self.diverged_at)
        self.loss_at = torch.where(first, loss, self.loss_at)

    def diverged_step(self):
        """The step at which the run diverged, or None (reads the device)."""
        step = int(self.diverged_at.item())
        return step or None

    def reason(self, step):
        """Why the run counts as diverged at ``step``, in words."""
        loss = self.loss_at.item()
        steps = f"{self.steps} consecutive steps ({step - self.steps + 1}-{step})"
        if not math.isfinite(loss):
            return f"the training loss was not finite for {steps}, {loss} at the last"
        return (
            f"the training loss was above {self.loss_factor:g} × its first logged value "
            f"{self.reference_loss:.4g} for {steps}, {loss:.4g} at the last"
        )

    def state_dict(self):
        """The counters, for a checkpoint."""
        return {
            "streak": self.streak,
            "diverged_at": self.diverged_at,
            "loss_at": self.loss_at,
            "reference_loss": self.reference_loss,
        }

    def load_state_dict(self, state):
        """Continue counting from ``state_dict``'s counters."""
        device = self.streak.device
        self.streak = state["streak"].to(device)
        self.diverged_at = state["diverged_at"].to(device)
        self.loss_at = state["loss_at"].to(device)
        self.reference_loss = state["reference_loss"]


def say(message):
    """Print a progress message to the terminal without breaking the progress bar."""
    tqdm.write(message, file=sys.stdout)


def _format_metrics(metrics):
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())


class _NoLog:
    """The metrics log of a process other than rank 0, which writes nothing."""

    def __init__(self, *arguments, **options):
        pass

    def write(self, step, split, values, details=None):
        pass

    def write_event(self, step, event):
        pass

    def offset(self):
        return 0

    def flush(self):
        pass

    def close(self):
        pass


class StopRequest:
    """Ctrl-C or SIGTERM in the training loop: finish the current step, save a checkpoint, stop.

    ``requested`` once a signal came (``signal_number``); a second one, or one once ``at_once`` is
    set (after the loop: the test, the figures), aborts at once.
    """

    def __init__(self):
        self.requested = False
        self.signal_number = None
        self.at_once = False

    @contextlib.contextmanager
    def on_signals(self):
        """Inside, SIGINT and SIGTERM request the stop (in the main thread; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {number: signal.getsignal(number) for number in signals}

        def request_stop(number, frame):
            if self.requested or self.at_once:
                raise Aborted(number)
            self.requested = True
            self.signal_number = number
            say("stopping after this step and saving a checkpoint (again to abort at once)")

        for number in signals:
            signal.signal(number, request_stop)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def floating_buffers(model):
    """The model's floating-point buffers: BatchNorm statistics, which each process keeps its own of."""
    return [buffer for buffer in model.buffers() if buffer.is_floating_point()]


@contextlib.contextmanager
def averaged_buffers(model, distributed):
    """Inside, every process holds the mean of the processes' BatchNorm statistics, so all evaluate
    and save one model; afterwards each its own again, so training goes on as if nothing happened.
    Yields this process's own buffers (None in a run of one process, which has nothing to average)."""
    if not distributed.is_distributed:
        yield None
        return
    buffers = floating_buffers(model)
    own = [buffer.clone() for buffer in buffers]
    distributed.mean_tensors(buffers)
    try:
        yield own
    finally:
        for buffer, saved in zip(buffers, own):
            buffer.copy_(saved)


class Trainer:
    """Trains one experiment in its run folder, from step 0 or from a checkpoint's state.

    ``checkpoint`` is the content of last.pt to continue from (checked by the runner; a state
    that still does not fit raises ``UserError`` before any file is touched). ``resume`` continues
    the folder's metrics file and event files (after the checkpoint's step; from step 0 without a
    checkpoint) instead of starting them. ``configuration`` (plain sections) goes into every
    checkpoint unread, so that a resume can tell whether configuration.txt was edited since.
    """

    def __init__(self, experiment, run_folder, checkpoint=None, *, resume=False, configuration=None):
        self.experiment = experiment
        self.configuration = configuration
        self.run_folder = run_folder
        self.settings = settings = experiment.settings
        self.distributed = experiment.distributed
        splits, device = experiment.splits, experiment.device
        # Training metrics since the last training record, and since the last evaluation.
        self.window = RunningMetrics(splits.task, splits.target_scale, device)
        self.interval = RunningMetrics(splits.task, splits.target_scale, device)
        self.evaluation = RunningMetrics(splits.task, splits.target_scale, device)
        self.quality, self.higher_is_better = quality_metric(splits.task)
        self.state = RunState()
        self.steps_this_session = 0
        self._elapsed_before = 0.0
        self.stop = StopRequest()
        self.stop_agreed = False
        self._evaluation_due = False
        self.divergence = DivergenceWatch(settings.divergence_steps, settings.divergence_loss_factor, device)
        # The step of the newest checkpoint in the run folder (None: none yet).
        self.checkpointed_step = None
        resume_offset, resume_step = 0, (0 if resume else None)
        if checkpoint is not None:
            resume_offset, resume_step = checkpoint["metrics_offset"], checkpoint["step"]
            # Before the metrics file is cut to the checkpoint's offset, so a misfit changes nothing.
            self._restore(checkpoint, run_folder.last_checkpoint_path)
        self.log = (MetricsLog if self.distributed.is_main else _NoLog)(
            run_folder.path,
            run_folder.metrics_path,
            tensorboard=settings.tensorboard,
            resume_offset=resume_offset,
            resume_step=resume_step,
        )
        self._session_start = time.perf_counter()

    # ------------------------------------------------------------------ the loop

    def train(self, stop_after_steps=None):
        """Train to ``training_steps`` (or ``stop_after_steps`` more steps), then test; return the outcome.

        Stopping early (``stop_after_steps``, Ctrl-C or SIGTERM) saves the last checkpoint at the
        step reached, so --resume continues exactly there. A run that diverges stops at the next
        log interval or evaluation, keeping its last good checkpoint.
        """
        total = self.settings.training_steps
        if self.state.finished and self.state.step == total:
            say(f"{self.run_folder.path} finished at step {self.state.step} already; nothing to train")
            return self.outcome()
        self.state.finished, self.state.test = False, None
        stop_at = total if stop_after_steps is None else min(total, self.state.step + stop_after_steps)
        steps_per_epoch = self.experiment.steps_per_epoch
        batches = self.experiment.data.training
        self.experiment.model.train()
        with self.stop.on_signals():
            with self._progress_bar(total) as bar:
                while self.state.step < stop_at and not self._stopping():
                    epoch, batch_in_epoch = divmod(self.state.step, steps_per_epoch)
                    for inputs, targets, key in batches.epoch(epoch, batch_in_epoch):
                        self._train_step(inputs, targets, key, bar)
                        if self.state.step >= stop_at or self._stopping():
                            break
            # From here on a signal stops at once: the checkpoint of the last step is written already
            # or is being written atomically, and a resume continues from it (and tests).
            self.stop.at_once = True
            # A signal during the last steps' evaluation is honoured too: no test, exit 128 + N.
            stop = self.distributed.any_rank(self.stop.requested)
            # The steps since the last log interval or evaluation may have diverged too.
            if self.state.diverged is None and not self._check_divergence():
                if self.state.step < total or stop:
                    if self.checkpointed_step == self.state.step or self._save_last_checkpoint() is not None:
                        before_test = ", before the test" if self.state.step == total else ""
                        say(f"stopped at step {self.state.step} of {total}{before_test}; continue with --resume")
                else:
                    self._test_best_checkpoint()
            self.log.flush()
        return self.outcome()

    def _stopping(self):
        if self.state.diverged is not None:
            return True
        if not self.distributed.is_distributed:
            return self.stop.requested
        return self.stop_agreed and self._can_checkpoint()

    def _can_checkpoint(self):
        """Whether a checkpoint now resumes every process: not inside the optimizer's partial sums of a batch."""
        return not (self.distributed.is_distributed and self.experiment.stepper.holds_partial_sums)

    def _train_step(self, inputs, targets, key, bar):
        """Train on one batch; then log, check for divergence, evaluate and checkpoint where due."""
        stepper, settings, step = self.experiment.stepper, self.settings, self.state.step + 1
        log_now = step % settings.log_every_steps == 0
        evaluate_now = step % settings.evaluate_every_steps == 0 or step == settings.training_steps
        with self._autocast():
            result = stepper.step(inputs, targets, key, report_as_step=step if log_now else None)
        self.state.step = step
        self.steps_this_session += 1
        self.window.add(result.loss, result.outputs, targets)
        self.interval.add(result.loss, result.outputs, targets)
        self.divergence.add(result.loss, step)
        bar.update()
        self._log_events(stepper.take_events())
        if log_now:
            self._log_training(result.values, bar)
        if log_now and self.distributed.is_distributed:
            self.stop_agreed = self.distributed.any_rank(self.stop.requested)
        if (log_now or evaluate_now) and self._check_divergence():
            return
        self._evaluation_due = self._evaluation_due or evaluate_now
        if self._evaluation_due and (self._can_checkpoint() or step == settings.training_steps):
            self._evaluation_due = False
            self._evaluate_and_checkpoint()

    def _autocast(self):
        """Forward passes in the settings' autocast dtype (an optimizer may measure in full precision inside)."""
        dtype = self.settings.autocast
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.experiment.device.type, dtype=dtype)

    # ------------------------------------------------------------------ logging and evaluation

    def _log_training(self, optimizer_values, bar):
        metrics = self.window.result(self.distributed)
        self.window.reset()
        self.log.write(self.state.step, "training", {**metrics, **optimizer_values})
        self.divergence.set_reference(metrics["loss"])
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{optimizer_values['learning_rate']:.3g}", refresh=False)

    def _log_events(self, events):
        """Record a line search's measurements and failures; print the reason of each failure."""
        for event in events:
            self.log.write_event(self.state.step, event)
            if event["event"] == "failure":
                say(f"step {self.state.step}: {event['reason']}")

    def _evaluate_and_checkpoint(self):
        experiment = self.experiment
        validation = self._evaluate(experiment.data.validation)
        epoch = self.state.step / experiment.steps_per_epoch
        elapsed = self._elapsed()
        self.log.write(
            self.state.step, "validation", validation, {"epoch": round(epoch, 4), "elapsed_seconds": round(elapsed, 3)}
        )
        training = self.interval.result(self.distributed)
        self.interval.reset()
        learning_rate = self.experiment.stepper.values(self.state.step)["learning_rate"]
        say(
            f"step {self.state.step}/{self.settings.training_steps} epoch {epoch:.4g} | "
            f"training {_format_metrics(training)} | validation {_format_metrics(validation)} | "
            f"lr {learning_rate:.4g} | {elapsed:.1f} s"
        )
        if self._is_better(validation):
            previous_best, self.state.best = self.state.best, {"step": self.state.step, "validation": validation}
            # last.pt first: killed before best.pt is written, a resume rebuilds best.pt from it.
            model_state = self._save_last_checkpoint()
            if model_state is None:
                self.state.best = previous_best
            else:
                best = {"step": self.state.step, "model": model_state, "validation": validation}
                self.distributed.on_main(lambda: save_checkpoint(best, self.run_folder.best_checkpoint_path))
        else:
            self._save_last_checkpoint()
        self.log.flush()

    def _evaluate(self, batches):
        experiment = self.experiment
        with averaged_buffers(experiment.model, self.distributed), self._autocast():
            return evaluate(
                experiment.network, experiment.model, batches, experiment.loss_function, self.evaluation,
                self.distributed,
            )

    def _is_better(self, validation):
        """Better validation accuracy (lower RMSE); on a tie, lower validation loss. Never a non-finite result."""
        if not all(math.isfinite(value) for value in validation.values()):
            return False
        if self.state.best is None:
            return True
        new, old = validation[self.quality], self.state.best["validation"][self.quality]
        if new != old:
            return (new > old) == self.higher_is_better
        return validation["loss"] < self.state.best["validation"]["loss"]

    def _test_best_checkpoint(self):
        """Evaluate the best validation checkpoint on the test split (the paper's protocol)."""
        experiment = self.experiment
        if self.state.best is None:
            self._stop_diverged(self.state.step, "no evaluation gave a finite validation loss and metric")
            return
        path = self.run_folder.best_checkpoint_path
        best = self.distributed.on_main(lambda: read_checkpoint(path, BEST_KEYS))
        if best["step"] != self.state.best["step"]:
            raise UserError(
                f"cannot use the checkpoint {path}: it holds step {best['step']}, not the best step {self.state.best['step']}"
            )
        load_model_state(experiment.model, best["model"], path)
        self.state.test = self._evaluate(experiment.data.test)
        passes = self.experiment.stepper.values(self.state.step)
        self.log.write(
            self.state.step,
            "test",
            self.state.test,
            {
                "best_step": best["step"],
                "elapsed_seconds": round(self._elapsed(), 3),
                "forward_passes": passes["forward_passes"],
                "backward_passes": passes["backward_passes"],
            },
        )
        say(
            f"test {_format_metrics(self.state.test)} with the checkpoint of step {best['step']} "
            f"(best validation {self.quality} {best['validation'][self.quality]:.4f})"
        )
        # Record that the run is complete, and put the final weights back.
        self.state.finished = True
        last = self.distributed.on_main(lambda: self._mark_last_checkpoint(finished=True, test=self.state.test))
        load_model_state(experiment.model, last["model"], self.run_folder.last_checkpoint_path)

    def _mark_last_checkpoint(self, **changes):
        """Record ``changes`` to the run's state (finished and its test, or the divergence) in last.pt,
        whose training state stays as saved; return the checkpoint. Rank 0 only."""
        path = self.run_folder.last_checkpoint_path
        checkpoint = read_checkpoint(path)
        state = dataclasses.replace(RunState.from_dict(checkpoint), **changes)
        checkpoint.update(state.to_dict(), metrics_offset=self.log.offset())
        save_checkpoint(checkpoint, path)
        return checkpoint

    # ------------------------------------------------------------------ divergence

    def _check_divergence(self):
        """Stop the run if the training loss has diverged on any process (reads the device); return whether it has."""
        step = self.divergence.diverged_step()
        found = (step, self.divergence.reason(step)) if step is not None else None
        if self.distributed.is_distributed:
            reports = self.distributed.gather_objects(found)
            rank, found = next(((rank, report) for rank, report in enumerate(reports) if report), (None, None))
            if found is not None:
                found = (found[0], f"{found[1]} (process {rank})")
        if found is not None:
            self._stop_diverged(*found)
        return found is not None

    def _stop_diverged(self, step, reason):
        """Record the divergence, keep the last good checkpoint and mark it, so that --resume reports it."""
        message = f"training diverged at step {step}: {reason}; {self.experiment.stepper.divergence_advice}"
        self.state.diverged = {"step": step, "reason": message}
        self.log.write(step, "diverged", {}, {"reason": message, "stopped_at_step": self.state.step})
        self.log.flush()
        say(message)
        path = self.run_folder.last_checkpoint_path
        if not self.distributed.is_main:
            return
        if not path.exists():
            say("no checkpoint was saved before the divergence")
            return
        last = self._mark_last_checkpoint(diverged=self.state.diverged)
        say(f"the last good checkpoint, of step {last['step']}, is kept in {path}")

    # ------------------------------------------------------------------ checkpoints

    def _save_last_checkpoint(self):
        """Save last.pt and return the model state it holds; a model with a non-finite parameter or
        buffer is never saved: the run diverged (None).

        In several processes the model state holds the mean of their BatchNorm statistics, and the
        checkpoint each process's own, which a resume on as many processes restores.
        """
        experiment = self.experiment
        with averaged_buffers(experiment.model, self.distributed) as own_buffers:
            model_state = experiment.model.state_dict()
            if own_buffers is not None:
                # The buffers return to this process's own afterwards; the saved state keeps the mean.
                model_state = {name: tensor.clone() for name, tensor in model_state.items()}
        name = non_finite_entry(model_state)
        if name is not None:
            self._stop_diverged(self.state.step, f"the model's {name} is not finite")
            return None
        process_buffers = None
        if own_buffers is not None:
            process_buffers = self.distributed.gather_objects([buffer.cpu() for buffer in own_buffers])
        self.state.elapsed_seconds = self._elapsed()
        state = {
            **self.state.to_dict(),
            "model": model_state,
            **experiment.stepper.state_dict(),
            "random_state": capture_random_state(),
            "training_window": self.window.state_dict(),
            "evaluation_interval": self.interval.state_dict(),
            "divergence": self.divergence.state_dict(),
            "metrics_offset": self.log.offset(),
            # Rank 0's state holds only its own partial sums; resumable in one process at most.
            "partial_sums_of_processes": self.distributed.world_size if not self._can_checkpoint() else None,
            "process_buffers": process_buffers,
            "configuration": self.configuration,
        }
        # Through rank 0, so that a write that fails stops every process with its one line.
        self.distributed.on_main(lambda: save_checkpoint(state, self.run_folder.last_checkpoint_path))
        self.checkpointed_step = self.state.step
        return model_state

    def _restore(self, checkpoint, path):
        """Take over the checkpoint's state; ``UserError`` naming ``path`` when it does not fit this run."""
        experiment = self.experiment
        load_model_state(experiment.model, checkpoint["model"], path)
        try:
            experiment.stepper.load_state_dict(checkpoint)
            self.window.load_state_dict(checkpoint["training_window"])
            self.interval.load_state_dict(checkpoint["evaluation_interval"])
            if "divergence" in checkpoint:
                self.divergence.load_state_dict(checkpoint["divergence"])
            # Last, so that nothing built above draws from the restored generators.
            restore_random_state(checkpoint["random_state"])
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as error:
            detail = " ".join(str(error).split())[:100] or type(error).__name__
            raise UserError(f"cannot use the checkpoint {path}: it does not fit this run ({detail})") from None
        process_buffers = checkpoint.get("process_buffers")
        if process_buffers is not None and len(process_buffers) == self.distributed.world_size:
            # The same processes: each continues with its own statistics; otherwise with their mean.
            for buffer, saved in zip(floating_buffers(experiment.model), process_buffers[self.distributed.rank]):
                buffer.copy_(saved)
        if checkpoint.get("partial_sums_of_processes") and self.distributed.is_distributed:
            raise UserError(
                f"cannot continue {path} in several processes: its {checkpoint['partial_sums_of_processes']} "
                "processes stopped inside a training batch of the optimizer, whose partial sums only process 0 saved; "
                "continue it in one process"
            )
        self.state = RunState.from_dict(checkpoint)
        self._elapsed_before = self.state.elapsed_seconds
        self.checkpointed_step = self.state.step

    # ------------------------------------------------------------------ helpers

    def _elapsed(self):
        return self._elapsed_before + time.perf_counter() - self._session_start

    def outcome(self):
        """The run's state now, as a ``RunOutcome``."""
        return self.state.outcome(self.stop.signal_number)

    def close(self):
        """Close the metrics file and the TensorBoard writer."""
        self.log.close()

    def _progress_bar(self, total):
        return tqdm(
            total=total,
            initial=self.state.step,
            unit="step",
            dynamic_ncols=True,
            # Carriage-return frames only make sense on a terminal, not in piped or batch-system logs.
            disable=not (self.settings.progress_bar and self.distributed.is_main and sys.stderr.isatty()),
            file=sys.stderr,
        )



def initial_loop_states(experiment):
    """The states a new ``Trainer`` of ``experiment`` starts from, by checkpoint key: a checkpoint's must
    match them in kind (source/training/checkpoint_contents.py)."""
    splits, settings, device = experiment.splits, experiment.settings, experiment.device
    metrics = RunningMetrics(splits.task, splits.target_scale, device).state_dict()
    return {
        "training_window": metrics,
        "evaluation_interval": metrics,
        "divergence": DivergenceWatch(settings.divergence_steps, settings.divergence_loss_factor, device).state_dict(),
        "random_state": capture_random_state(),
        "schedule": experiment.stepper.state_dict()["schedule"],
    }


def load_model_state(model, state, path):
    """``model.load_state_dict(state)``; ``UserError`` naming ``path`` when the weights are another model's."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__)[:100]
        raise UserError(f"cannot use the checkpoint {path}: it holds another model's weights ({detail})") from None
