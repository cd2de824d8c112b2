"""Start or resume one run: check its folder and checkpoints, build the experiment, train, and clean up on failure.

A resume checks last.pt against the experiment before anything in the folder changes: it must be
readable, complete, and hold this model's weights (dense, of its dtypes, all finite), this
optimizer's state and counters of the right types and ranges (checkpoint_contents.py). A damaged
last.pt gives way to last.previous.pt, the checkpoint it replaced, with a message. The best
checkpoint last.pt names must be there too: best.pt, best.previous.pt (when a kill or damage left
best.pt newer than last.pt), or, when the best is last.pt's own step, rebuilt from last.pt. The
configuration last.pt was saved with must match the one the run resumes with, apart from what a
resume may change (an edited configuration.txt is refused, its edits listed).

Rank 0 owns the run folder for the whole run (``RunFolder.hold``): a second process that starts
or resumes the same run stops with one line naming the owner.
"""

import contextlib

from source.errors import UserError, WriteFailed
from source.quality_metric import quality_metric
from source.training.checkpoint_contents import check_best_checkpoint
from source.training.checkpoints import previous_path, read_checkpoint, remove_partial_files, save_atomically
from source.training.experiment import build_experiment, single_process
from source.training.run_folder import RunFolder, configuration_record
from source.training.run_state import BEST_KEYS, RunState, read_last_checkpoint
from source.training.trainer import Trainer, initial_loop_states, say

__all__ = ["run_experiment"]


def _last_checkpoint(folder, experiment, repairs):
    """The checkpoint to resume from (None: none yet), falling back to last.previous.pt with a message.

    Files to rewrite are appended to ``repairs`` as (state, path), for when every check passed.
    """
    last = folder.last_checkpoint_path
    previous = previous_path(last)
    problem = None
    for path in (last, previous):
        if not path.exists():
            continue
        try:
            checkpoint = read_last_checkpoint(path, experiment, initial_loop_states(experiment))
        except UserError as error:
            problem = problem or error
            continue
        if path == previous:
            why = str(problem) if problem else f"{last} is missing"
            say(f"{why}; falling back to {previous}, of step {checkpoint['step']}")
            repairs.append((checkpoint, last))
        return checkpoint
    if problem is not None:
        raise problem
    return None


def _check_best(folder, checkpoint, model, quality, repairs):
    """Make sure best.pt holds the best checkpoint ``checkpoint`` names; ``UserError`` when it is lost.

    A best.pt of a later step than the best ``checkpoint`` knows (written after it, before a kill
    or damaged last.pt) is replaced by best.previous.pt, or rebuilt from ``checkpoint`` when the
    best is its own step, so the test never uses weights beyond the resumed run.
    """
    best = checkpoint["best"]
    if best is None:
        return
    wanted = best["step"]
    path = folder.best_checkpoint_path
    problem = None
    for candidate_path in (path, previous_path(path)):
        if not candidate_path.exists():
            continue
        try:
            candidate = read_checkpoint(candidate_path, BEST_KEYS)
            check_best_checkpoint(candidate, model, quality, candidate_path)
        except UserError as error:
            problem = problem or error
            continue
        if candidate["step"] == wanted:
            if candidate_path != path:
                say(f"{path} is not the best checkpoint of step {wanted}; restoring it from {candidate_path}")
                repairs.append((candidate, path))
            return
    if checkpoint["step"] == wanted:
        # Killed between the last.pt and best.pt writes: the best weights are last.pt's own.
        say(f"{path} is not the best checkpoint of step {wanted}; rebuilding it from the last checkpoint")
        repairs.append(({"step": wanted, "model": checkpoint["model"], "validation": best["validation"]}, path))
        return
    if problem is not None:
        raise problem
    found = "does not exist" if not path.exists() else "holds another step"
    raise UserError(
        f"cannot resume {folder.path}: its best checkpoint (step {wanted}) is lost: {path} {found}; "
        "start the run again under another name"
    )


def _claim_folder(folder, configuration, resume, locks):
    """Check that the run may start (or continue) in ``folder``; when resuming, take its lock into ``locks``."""
    folder.check_can_start(configuration, resume)
    if resume:
        locks.append(folder.hold())


def _prepare_folder(folder, experiment, configuration, resume, locks):
    """Check the checkpoints to resume from, repair and tidy the folder (or create it, locked, into
    ``locks``), write the run's resolved configuration.txt; return last.pt's state.

    Runs on rank 0 only: the one process that reads and writes the run folder.
    """
    checkpoint, repairs = None, []
    if resume:
        checkpoint = _last_checkpoint(folder, experiment, repairs)
    if checkpoint is not None and checkpoint.get("configuration") is not None:
        folder.check_saved_configuration(checkpoint["configuration"], configuration, folder.last_checkpoint_path)
    if checkpoint is not None:
        total = experiment.settings.training_steps
        if checkpoint["step"] > total:
            raise UserError(
                f"{configuration.where('training', 'training_steps')}: {total} is less than the "
                f"{checkpoint['step']} steps {folder.path} has run already"
            )
        _check_best(folder, checkpoint, experiment.model, quality_metric(experiment.splits.task)[0], repairs)
    if resume:
        remove_partial_files(folder.path)
    for state, path in repairs:
        save_atomically(state, path)
    if checkpoint is not None:
        if checkpoint.get("diverged"):
            say(f"{folder.path} diverged already; nothing to train")
        else:
            say(f"resuming {folder.path} from step {checkpoint['step']}")
    elif resume:
        say(f"{folder.path} has no checkpoint yet: starting it again from step 0")
    if not resume:
        locks.append(folder.create(configuration))
    elif not (checkpoint and checkpoint.get("diverged")):
        # What the run continues with: its --set changes and the machine's choices.
        folder.write_configuration(configuration)
    return checkpoint


def run_experiment(configuration, *, resume=False, stop_after_steps=None, distributed=None):
    """Train the experiment ``configuration`` describes in ``<runs_folder>/<name>``; return a ``RunOutcome``.

    Everything is validated and built before a new run folder is created, and a new run that
    fails before its first step removes its folder again. With ``resume`` the run continues from
    its last checkpoint (or from step 0 if it has none yet); the checkpoints are checked first, and
    temporary files of writes a kill interrupted are removed. A run that diverged already is not
    trained again. ``stop_after_steps`` stops after that many steps, saving a checkpoint as if the
    run had been interrupted. ``distributed`` is this process's place in a run of several
    processes (torchrun); rank 0 alone checks, reads and writes the run folder and tells the others.
    """
    folder = RunFolder.of(configuration)
    distributed = distributed or single_process(configuration)
    locks = []  # rank 0's lock on the run folder, held until the run ends
    try:
        distributed.on_main(lambda: _claim_folder(folder, configuration, resume, locks))
        return _run_in_folder(folder, configuration, resume, stop_after_steps, distributed, locks)
    finally:
        for lock in locks:
            lock.release()


def _run_in_folder(folder, configuration, resume, stop_after_steps, distributed, locks):
    experiment = distributed.together(lambda: build_experiment(configuration, distributed))
    configuration = configuration.with_values(experiment.resolved)
    if experiment.data.note:
        say(experiment.data.note)
    checkpoint = distributed.on_main(lambda: _prepare_folder(folder, experiment, configuration, resume, locks))
    if checkpoint is not None and checkpoint.get("diverged"):
        return RunState.from_dict(checkpoint).outcome()
    trainer = None
    record = configuration_record(configuration)
    try:
        trainer = distributed.together(
            lambda: Trainer(experiment, folder, checkpoint, resume=resume, configuration=record)
        )
        outcome = trainer.train(stop_after_steps)
    except BaseException as error:
        if trainer is not None:
            # The error that stopped the run is the one to report, not a second failing write.
            with contextlib.suppress(WriteFailed):
                trainer.close()
        removed = distributed.is_main and not resume and (trainer is None or trainer.steps_this_session == 0)
        if removed:
            folder.remove()
        if isinstance(error, WriteFailed):
            raise WriteFailed(f"{error}; {_what_is_kept(trainer, removed)}") from error
        raise
    trainer.close()
    return outcome


def _what_is_kept(trainer, removed):
    """What a run stopped by a refused write leaves, and how to go on once the cause is fixed."""
    if removed:
        return "nothing was trained yet; start the run again once that is fixed"
    step = trainer.checkpointed_step if trainer is not None else None
    kept = f"the checkpoint of step {step} is kept" if step is not None else "no checkpoint was saved yet"
    return f"{kept}; once that is fixed, continue with --resume"
