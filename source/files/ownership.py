"""Ownership of a run or comparison folder: one process at a time, through an OS file lock.

The owner holds ``fcntl.flock`` on the file ``owner.lock`` inside the folder for as long as it
works there, and writes its process id, host and start time into that file. The operating system
releases the lock when the owner exits in any way, kill -9 included, so a lock is never stale;
the file stays behind naming its last owner and means nothing while no process holds its lock.
A process that asks for a held folder gets ``FolderInUse`` (a ``UserError``: one line naming the
owner), at once or after waiting up to ``wait_seconds`` for the owner to let go.

File systems without working locks (some NFS and Lustre mounts, where flock fails with ENOLCK,
EOPNOTSUPP or ENOSYS) are refused with ``LocksUnsupported`` rather than used unlocked: there two
processes could interleave their records unseen.

A new folder is built complete under a hidden name beside its own and then renamed into place
(``create_owned_folder``), so a kill at any moment leaves either no folder of that name or a
complete one. The hidden leftovers of killed starts are removed by the next start beside them.

    lock = hold_folder("runs/name", what="run folder", wait_seconds=5)   # FolderInUse after 5 s
    try:
        ...                                                               # work in the folder
    finally:
        lock.release()
"""

import errno
import fcntl
import os
import shutil
import secrets
import socket
import time
from pathlib import Path

from source.errors import UserError

__all__ = [
    "LOCK_FILE",
    "FolderInUse",
    "FolderLock",
    "LocksUnsupported",
    "create_owned_folder",
    "hold_folder",
    "is_held",
    "read_holder",
]

LOCK_FILE = "owner.lock"
"""The file in an owned folder whose lock is the ownership, and which names the owner."""

_STARTING_SUFFIX = ".starting"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_POLL_SECONDS = 0.05
_LONGEST_HOLDER = 200


class FolderInUse(UserError):
    """The folder is held by another process; ``holder`` names it ("process 12 on host since ...")."""

    def __init__(self, message, holder):
        super().__init__(message)
        self.holder = holder


class LocksUnsupported(UserError):
    """The folder's file system does not support file locks, so its ownership cannot be guaranteed."""


class FolderLock:
    """The lock on one folder: ``acquire`` it, work in the folder, ``release`` it (or use ``with``).

    ``what`` names the folder in messages ("run folder", "comparison folder"), and ``shown`` its
    path there when that is not ``folder`` (a folder being built under a hidden name). The lock
    belongs to the open file, so it is held across threads of this process and by forked children
    (data loader workers) until they exit too; a program this process executes never inherits it.
    """

    def __init__(self, folder, what="run folder", shown=None):
        self.folder = Path(folder)
        self.what = what
        self.shown = Path(shown or folder)
        self._descriptor = None

    @property
    def held(self):
        """Whether this object holds the lock now."""
        return self._descriptor is not None

    def acquire(self, wait_seconds=0.0):
        """Take the lock, waiting up to ``wait_seconds`` for its owner; return self.

        Raises ``FolderInUse`` when another process still holds it, ``LocksUnsupported`` on a file
        system without locks, and ``UserError`` when the lock file cannot be opened.
        """
        if self.held:
            return self
        deadline = time.monotonic() + wait_seconds
        while True:
            descriptor = self._open()
            try:
                self._wait_for_lock(descriptor, deadline, wait_seconds)
            except BaseException:
                os.close(descriptor)
                raise
            if self._still_in_place(descriptor):
                break
            # The owner we waited for removed the folder (a run that failed before its first
            # step) or its lock file: the lock taken is on a file no longer there; look again.
            os.close(descriptor)
        _write_holder(descriptor)
        self._descriptor = descriptor
        return self

    def _wait_for_lock(self, descriptor, deadline, wait_seconds):
        while not self._try_lock(descriptor):
            left = deadline - time.monotonic()
            if left <= 0:
                holder = read_holder(self.folder) or "another process"
                waited = f" (waited {wait_seconds:g} s)" if wait_seconds > 0 else ""
                raise FolderInUse(
                    f"{self.shown} is in use by {holder}{waited}; a {self.what} belongs to one process "
                    "at a time: wait for that one to end, or stop it",
                    holder,
                )
            time.sleep(min(_POLL_SECONDS, left))

    def _still_in_place(self, descriptor):
        """Whether the locked file is still the folder's lock file."""
        try:
            current = os.stat(self.folder / LOCK_FILE, follow_symlinks=False)
        except OSError:
            return False
        locked = os.fstat(descriptor)
        return (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino)

    def release(self):
        """Let go of the lock (closing the file releases it); nothing when not held."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def moved_to(self, folder):
        """Record that the held folder was renamed to ``folder`` (the lock goes with it)."""
        self.folder = self.shown = Path(folder)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exception):
        self.release()

    def _open(self):
        path = self.folder / LOCK_FILE
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UserError(f"{path} is a symbolic link; remove it (the {self.what} owns this file)") from None
            if error.errno == errno.ENOENT and not self.folder.is_dir():
                raise UserError(f"cannot lock the {self.what} {self.shown}: it does not exist (any more)") from None
            raise UserError(f"cannot lock the {self.what} {self.shown}: {path}: {error.strerror or error}") from None

    def _try_lock(self, descriptor):
        """Whether the lock was taken; False while another process holds it."""
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            if error.errno in _UNSUPPORTED:
                raise LocksUnsupported(
                    f"cannot lock the {self.what} {self.shown}: its file system does not support file locks "
                    f"({error.strerror}), which keep a second process out of it; put it on a file system that "
                    "does (a local disk, or NFS or Lustre mounted with locking)"
                ) from None
            raise UserError(f"cannot lock the {self.what} {self.shown}: {error.strerror or error}") from None
        return True


def hold_folder(folder, *, what="run folder", wait_seconds=0.0):
    """The acquired ``FolderLock`` of the existing ``folder`` (see ``FolderLock.acquire``)."""
    return FolderLock(folder, what).acquire(wait_seconds)


def _open_lock_file(folder):
    """A read-only descriptor of ``folder``'s lock file (never through a link), or None without one."""
    try:
        return os.open(Path(folder) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None


def is_held(folder):
    """Whether a process owns ``folder`` now (holds its lock), asked without writing anything."""
    descriptor = _open_lock_file(folder)
    if descriptor is None:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        return error.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(descriptor)


def read_holder(folder):
    """Who holds, or last held, ``folder``: "process PID on HOST since TIME", or None if unknown."""
    descriptor = _open_lock_file(folder)
    if descriptor is None:
        return None
    try:
        text = os.read(descriptor, _LONGEST_HOLDER).decode("utf-8", errors="replace")
    except OSError:
        return None
    finally:
        os.close(descriptor)
    return " ".join(text.split()) or None


def _write_holder(descriptor):
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    text = f"process {os.getpid()} on {socket.gethostname()} since {started}\n".encode()
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, text, 0)
    except OSError:
        pass  # the lock holds without the note; a full disk only costs the owner's name in messages


def create_owned_folder(path, fill, *, what="run folder"):
    """Create the folder ``path`` complete and owned: return its acquired ``FolderLock``.

    The folder is built under a hidden name beside ``path``, locked, filled by ``fill(folder)``
    and renamed to ``path``, which replaces at most an empty folder. Raises ``UserError`` when
    ``path`` holds something already (another process may just have created it).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_starts(path.parent)
        # os.mkdir, unlike mkdtemp, gives the folder the permissions the umask asks for.
        staging = path.parent / f".{path.name[:100]}.{secrets.token_hex(6)}{_STARTING_SUFFIX}"
        staging.mkdir()
    except OSError as error:
        raise UserError(f"cannot create the {what} {path}: {error.strerror or error}") from None
    lock = FolderLock(staging, what, shown=path)
    try:
        lock.acquire()
        fill(staging)
        os.rename(staging, path)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        lock.release()
        if isinstance(error, OSError) and error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise UserError(
                f"{path} already exists (another process may just have created it): continue that {what} "
                "with --resume, or choose another experiment name"
            ) from None
        if isinstance(error, OSError):
            raise UserError(f"cannot create the {what} {path}: {error.strerror or error}") from None
        raise
    lock.moved_to(path)
    return lock


def _remove_abandoned_starts(parent):
    """Delete the hidden folders that killed starts left in ``parent`` (those whose lock nobody holds)."""
    for candidate in Path(parent).glob(f".*{_STARTING_SUFFIX}"):
        if candidate.is_symlink() or not candidate.is_dir() or not (candidate / LOCK_FILE).exists():
            continue  # no lock file yet: a start that is creating it now
        try:
            lock = hold_folder(candidate, what="folder being started")
        except UserError:
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        lock.release()
