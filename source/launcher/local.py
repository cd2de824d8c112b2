"""Train a grid's runs on this machine, ``parallel`` at a time, each in a child process.

A child is exactly a single run: ``python main.py --config <run folder>/configuration.txt
--resume``, its output appended to the run folder's output.log. On CUDA each child sees one GPU
(``CUDA_VISIBLE_DEVICES``, round-robin over the visible ones, ``runs_per_device`` children each);
on a CPU the cores are divided between the children. Children end with the launcher: a SIGINT or
SIGTERM to the launcher stops them at their next step with a checkpoint, and on Linux a launcher
that is killed outright takes them with it (PR_SET_PDEATHSIG), so that a relaunch finds no run
still held by an orphan.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from source.launcher.grid import run_state, test_result

__all__ = ["ChildSlot", "child_slots", "train_in_children"]

MAIN_SCRIPT = Path(__file__).resolve().parents[2] / "main.py"
DIVERGED_STATUS = 3
STOPPED_STATUSES = {128 + signal.SIGINT, 128 + signal.SIGTERM}
_POLL_SECONDS = 0.1
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSlot:
    """Where one child trains: a GPU (its index among the visible ones) or a share of the CPU cores."""

    gpu: str | None
    cpu_threads: int | None

    def describe(self):
        """How the launcher's lines name the slot."""
        return f"GPU {self.gpu}" if self.gpu is not None else f"CPU, {self.cpu_threads} threads"


def _visible_gpus():
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [name.strip() for name in listed.split(",") if name.strip()][: torch.cuda.device_count()]
    return [str(index) for index in range(torch.cuda.device_count())]


def child_slots(settings, runs):
    """One ``ChildSlot`` per run that may train at once.

    GPUs when the runs' device allows CUDA and one is visible (child k on GPU k mod the number of
    GPUs), else the CPU's cores divided between the slots, for runs whose cpu_threads is "auto".
    """
    wants_gpu = any(run.configuration.settings.experiment.device != "cpu" for run in runs)
    gpus = _visible_gpus() if wants_gpu else []
    count = settings.parallel_runs(len(gpus))
    if gpus:
        return [ChildSlot(gpus[index % len(gpus)], None) for index in range(count)]
    threads = max(1, (os.cpu_count() or 1) // count)
    return [ChildSlot(None, threads) for _ in range(count)]


def _die_with_parent(parent):
    """In the child before it runs main.py: be killed when the launcher dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)


def _command(run, slot):
    command = [sys.executable, str(MAIN_SCRIPT), "--config", str(run.folder.configuration_path), "--resume"]
    sets = ["logging.progress_bar=false"]
    experiment = run.configuration.settings.experiment
    if slot.gpu is not None:
        sets.append("experiment.device=cuda")
    elif experiment.cpu_threads == "auto":
        sets.append(f"experiment.cpu_threads={slot.cpu_threads}")
    return command + [argument for value in sets for argument in ("--set", value)]


def _environment(slot):
    environment = dict(os.environ)
    if slot.gpu is not None:
        environment["CUDA_VISIBLE_DEVICES"] = slot.gpu
    else:
        environment["OMP_NUM_THREADS"] = str(slot.cpu_threads)
    return environment


def _last_line(path):
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


@dataclass
class _Child:
    run: object
    slot: ChildSlot
    process: subprocess.Popen


def train_in_children(runs, slots, report):
    """Train ``runs`` (``GridRun``s, folders written) in child processes on ``slots``.

    ``report(run, event, detail)`` is called when a run starts ("started", the slot) and ends
    ("finished", "diverged", "failed" with the reason, "stopped"). A failing run never stops the
    others. SIGINT or SIGTERM stops every child with a checkpoint, waits for them, and raises
    ``KeyboardInterrupt`` carrying the signal number. Returns {run: event} of the runs that ended.
    """
    waiting, children, free, ended = list(runs), [], list(slots), {}
    stop = []

    def request_stop(number, frame):
        if not stop:
            for child in children:
                child.process.send_signal(signal.SIGTERM)
        stop.append(number)

    handlers = {number: signal.signal(number, request_stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (waiting and not stop) or children:
            while waiting and free and not stop:
                children.append(_start(waiting.pop(0), free.pop(0), report))
            time.sleep(_POLL_SECONDS)
            for child in [child for child in children if child.process.poll() is not None]:
                children.remove(child)
                free.append(child.slot)
                ended[child.run] = _finish(child, report)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    if stop:
        interrupt = KeyboardInterrupt()
        interrupt.signal_number = stop[0]
        raise interrupt
    return ended


def _start(run, slot, report):
    run.write_configuration()
    run.folder.failure_path.unlink(missing_ok=True)
    parent = os.getpid()
    with open(run.output_path, "ab") as output:
        process = subprocess.Popen(
            _command(run, slot),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_environment(slot),
            preexec_fn=lambda: _die_with_parent(parent),
        )
    report(run, "started", slot.describe())
    return _Child(run, slot, process)


def _finish(child, report):
    run, status = child.run, child.process.returncode
    if status == 0 and run_state(run).status == "finished":
        event, detail = "finished", test_result(run)
    elif status == DIVERGED_STATUS:
        event, detail = "diverged", _last_line(run.output_path)
    elif status in STOPPED_STATUSES or status == 0:
        event, detail = "stopped", f"at step {run_state(run).step}"
    else:
        event = "failed"
        detail = f"exit status {status}: {_last_line(run.output_path)} (output: {run.output_path})"
        run.folder.failure_path.write_text(detail + "\n", encoding="utf-8")
    report(run, event, detail)
    return event
