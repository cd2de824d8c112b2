"""The run folder ``<runs_folder>/<experiment name>/`` and the rules for starting or resuming in it.

A new run never reuses a folder: if it exists, the run stops with a message to pass --resume
or to choose another experiment name. A resumed run continues with the configuration the folder
was started with (its configuration.txt), where the machine's choices for "auto" keys are
recorded; only keys that do not change the experiment's results
(see ``RESUMABLE``) may be changed, and only with --set (see ``configuration_to_resume``).
Every checkpoint carries the configuration too, so an edited configuration.txt is found
(``check_saved_configuration``).

One process owns a run folder while it works there (``source.files.ownership``): a new folder
appears complete, holding its configuration.txt, and is locked from then on; a resume locks it
before it reads the checkpoints.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

from source.configuration import Configuration, differing_keys, format_configuration, key_label
from source.errors import UserError
from source.files import check_writable_folder, create_owned_folder, hold_folder, write_text_atomically
from source.configuration.settings import AUTOMATIC, MACHINE_CHOICES, ExperimentSettings
from source.records.run_files import RunFiles
from source.registries import load_configuration

__all__ = [
    "LOCATION",
    "RESUMABLE",
    "RunFolder",
    "configuration_to_resume",
    "configuration_record",
    "is_resumable",
]

RESUMABLE = {
    ("experiment", "device"),
    ("experiment", "label"),
    ("experiment", "cpu_threads"),
    ("experiment", "runs_folder"),
    ("data", "root"),
    ("data", "download"),
    ("data", "num_workers"),
    ("training", "training_steps"),
    ("training", "evaluation_batch_size"),
    ("logging", "tensorboard"),
    ("logging", "progress_bar"),
    ("logging", "log_every_steps"),
    ("logging", "plots_folder"),
}
"""(section, key) pairs a resumed run may change: where and how it runs, how long, what it logs."""

RESUMABLE_SECTIONS = {"launcher"}
"""Sections every key of which a resumed run may change: where its processes run."""


def is_resumable(path):
    """Whether the key at ``path`` (("training", "training_steps")) may change when a run resumes."""
    return path[0] in RESUMABLE_SECTIONS or path in RESUMABLE


LOCATION = (("experiment", "runs_folder"), ("experiment", "name"))
"""The keys that find a run folder: a resumed run takes them from where it was found, not from its
configuration.txt, so that a moved or renamed run folder resumes where it is now."""

def configuration_to_resume(configuration):
    """The configuration to resume the run that ``configuration`` names, and a note on what it ignored.

    The run folder is <runs_folder>/<experiment name> of ``configuration`` (its file and --set
    options); the run continues with the configuration stored there. A value given with --set
    replaces the stored one if its key is ``RESUMABLE``; a --set of any other key that differs
    from the stored value raises ``UserError``. Differences that come from the file are ignored and
    listed in the note ("ignoring changes in FILE: training.training_steps 3000 (saved: 300)"),
    which is None when there are none. Without a stored configuration ``configuration`` is
    returned as it is, for ``RunFolder.check_can_start`` to explain.
    """
    folder = RunFolder.of(configuration)
    with configuration.blame("experiment", "runs_folder"):
        check_writable_folder(folder.path)
    if not folder.configuration_path.is_file():
        return configuration, None
    stored = load_configuration(folder.configuration_path)
    if stored.is_comparison:
        raise UserError(
            f"cannot resume {folder.path} as a run: it is a comparison; resume it with "
            f"--config {folder.configuration_path} --resume"
        )
    sections = {name: _copy(section) for name, section in stored.sections.items()}
    overrides, ignored = {}, []
    for path in _differences(stored, configuration):
        value, saved = _value_at(configuration.sections, path), _value_at(stored.sections, path)
        if path in LOCATION:
            _set_value(sections, path, value)
        elif path in configuration.overrides:
            given = configuration.overrides[path]
            if not is_resumable(path):
                allowed = ", ".join([*(".".join(key) for key in sorted(RESUMABLE)), *sorted(RESUMABLE_SECTIONS)])
                raise UserError(
                    f"{given}: {key_label(path[:-1], path[-1])} cannot change when resuming {folder.path} "
                    f"(saved: {_shown(saved)}); a resumed run may change only {allowed}; "
                    "start a new run under another name with --set experiment.name=NAME"
                )
            _set_value(sections, path, value)
            overrides[path] = given
        else:
            ignored.append(f"{'.'.join(path)} {_shown(value)} (saved: {_shown(saved)})")
    note = None
    if ignored:
        note = (
            f"ignoring changes in {configuration.source}: {', '.join(ignored)}; a resumed run keeps its "
            f"{folder.configuration_path}"
        )
    return Configuration(sections=sections, source=str(folder.configuration_path), overrides=overrides), note


def _differences(stored, configuration):
    """The keys whose values differ; "auto" where the stored configuration records the machine's choice is none."""
    return [
        path
        for path in differing_keys(stored, configuration)
        if not (path in MACHINE_CHOICES and _value_at(configuration.sections, path) == AUTOMATIC)
    ]


def _fixed_differences(stored, configuration):
    """The differing keys that a resume may not change (neither resumable nor the run's location)."""
    return [path for path in _differences(stored, configuration) if not is_resumable(path) and path not in LOCATION]


_MISSING = object()
"""The value of a key that one of two configurations lacks (an optimizer argument given in only one)."""


def _copy(section):
    return {key: _copy(value) for key, value in section.items()} if isinstance(section, dict) else section


def configuration_record(configuration):
    """What a checkpoint keeps of the configuration: its sections as plain dicts, lists and values,
    without the ``LOCATION`` keys, so that the same run under another name or folder saves the same."""
    sections = _copy(configuration.sections)
    for path in LOCATION:
        _set_value(sections, path, _MISSING)
    return sections


def _value_at(sections, path):
    for name in path:
        if not isinstance(sections, dict) or name not in sections:
            return _MISSING
        sections = sections[name]
    return sections


def _set_value(sections, path, value):
    for name in path[:-1]:
        sections = sections.setdefault(name, {})
    if value is _MISSING:
        sections.pop(path[-1], None)
    else:
        sections[path[-1]] = value


def _shown(value):
    """A value as it is written in a configuration file (lists comma-separated)."""
    if value is _MISSING:
        return "not set"
    if isinstance(value, list):
        return ", ".join(map(str, value)) + ("," if len(value) == 1 else "")
    if isinstance(value, str) and not value.strip():
        return repr(value)
    return str(value)


@dataclass(frozen=True)
class RunFolder(RunFiles):
    """A run's folder, with the rules for starting and resuming a run in it."""

    @classmethod
    def of(cls, configuration):
        """The run folder a configuration names: <runs_folder>/<experiment name>."""
        experiment = configuration.settings.experiment
        return cls(Path(experiment.runs_folder) / experiment.name)

    def check_can_start(self, configuration, resume):
        """Raise ``UserError`` unless a new run may start here (or, with ``resume``, continue here).

        An empty folder (left by an older version killed at start-up) does not count as a run.
        """
        with configuration.blame("experiment", "runs_folder"):
            check_writable_folder(self.path)
        if not resume:
            if self.path.exists() and not _is_empty_folder(self.path):
                raise UserError(
                    f"{self.path} already exists: continue that run with --resume, or start a new one "
                    "under another name with --set experiment.name=NAME"
                )
            return
        if not self.configuration_path.is_file():
            if self.path.exists():
                raise UserError(f"cannot resume {self.path}: it has no configuration.txt, so it is not a run folder")
            raise UserError(f"cannot resume {self.path}: it does not exist; start the run without --resume")
        stored = load_configuration(self.configuration_path)
        changed = [key_label(path[:-1], path[-1]) for path in _fixed_differences(stored, configuration)]
        if changed:
            raise UserError(
                f"cannot resume {self.path}: {', '.join(changed)} differ from its configuration.txt; "
                f"resume with --config {self.configuration_path}"
            )

    def check_saved_configuration(self, saved_sections, configuration, checkpoint_path):
        """Raise ``UserError`` if ``configuration`` differs from the one the checkpoint was saved with
        (``saved_sections``) in a key that a resume may not change: configuration.txt was edited."""
        saved = Configuration(sections=saved_sections, source=str(checkpoint_path))
        changed = [
            f"{'.'.join(path)} {_shown(_value_at(configuration.sections, path))} "
            f"(checkpoint: {_shown(_value_at(saved.sections, path))})"
            for path in _fixed_differences(saved, configuration)
        ]
        if changed:
            raise UserError(
                f"cannot resume {self.path}: its configuration.txt was changed after {checkpoint_path} was saved: "
                f"{', '.join(changed)}; put the saved values back, or start a new run under another name "
                "with --set experiment.name=NAME"
            )

    def hold(self):
        """Take the folder's lock for this process (``FolderInUse`` while another one works here)."""
        return hold_folder(self.path, what="run folder")

    def create(self, configuration):
        """Make the folder of a new run, holding its configuration.txt, and return its lock."""
        return create_owned_folder(
            self.path, lambda folder: self.write_configuration(configuration, folder), what="run folder"
        )

    def remove(self):
        """Delete the folder and everything in it (a new run that failed before its first step)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def write_configuration(self, configuration, folder=None):
        """Store the resolved configuration (file, overrides and defaults) in the folder
        (or in ``folder``, where the run folder is being built)."""
        header = [
            f"Resolved configuration of the run in {self.path}: {configuration.source},",
            "the --set overrides and the defaults of source/configuration/configspec.ini.",
            f"Resume it with: python main.py --config {self.configuration_path} --resume",
        ]
        target = self.configuration_path if folder is None else Path(folder) / self.configuration_path.name
        write_text_atomically(format_configuration(configuration, header), target)


def _is_empty_folder(path):
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
