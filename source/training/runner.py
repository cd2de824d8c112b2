"""Start or resume one run: check its folder, build the experiment, train, and clean up on failure."""

from source.errors import UserError
from source.training.checkpoints import load_checkpoint
from source.training.experiment import build_experiment
from source.training.run_folder import RunFolder
from source.training.trainer import Trainer, say

__all__ = ["run_experiment"]


def _read_checkpoint(path):
    try:
        return load_checkpoint(path)
    except Exception as error:  # any unreadable file is the user's to replace or remove
        raise UserError(f"cannot read the checkpoint {path}: {error}") from None


def run_experiment(configuration, *, resume=False, stop_after_steps=None):
    """Train the experiment ``configuration`` describes in ``<runs_folder>/<name>``; return a ``RunOutcome``.

    Everything is validated and built before a new run folder is created, and a new run that
    fails before its first step removes its folder again. With ``resume`` the run continues from
    its last checkpoint (or from step 0 if it has none yet). ``stop_after_steps`` stops after that
    many steps, saving a checkpoint as if the run had been interrupted.
    """
    folder = RunFolder.of(configuration)
    folder.check_can_start(configuration, resume)
    experiment = build_experiment(configuration)
    checkpoint = None
    if resume and folder.last_checkpoint_path.exists():
        checkpoint = _read_checkpoint(folder.last_checkpoint_path)
        total = configuration["training"]["training_steps"]
        if checkpoint["step"] > total:
            raise UserError(
                f"{configuration.where('training', 'training_steps')}: {total} is less than the "
                f"{checkpoint['step']} steps {folder.path} has run already"
            )
        say(f"resuming {folder.path} from step {checkpoint['step']}")
    elif resume:
        say(f"{folder.path} has no checkpoint yet: starting it again from step 0")
    if not resume:
        folder.create()
    trainer = None
    try:
        folder.write_configuration(configuration)
        trainer = Trainer(experiment, folder, checkpoint, resume=resume)
        outcome = trainer.train(stop_after_steps)
    except BaseException:
        if trainer is not None:
            trainer.close()
        if not resume and (trainer is None or trainer.steps_this_session == 0):
            folder.remove()
        raise
    trainer.close()
    return outcome
