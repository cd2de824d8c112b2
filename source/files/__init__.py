"""File-system mechanisms every writer of the project shares: folder ownership, confined writes, writable folders.

``ownership``: a run or comparison folder is held by one process through an OS file lock, and a
new folder appears under its name only once it is complete. ``confined``: files are written inside
their folder without following symbolic links (atomic replacement, appends that refuse a link).
``writable``: a folder is checked for writing before the work whose results go there.
"""

from source.files.confined import (
    PARTIAL_SUFFIX,
    open_for_append,
    remove_partial_files,
    replace_atomically,
    write_text_atomically,
)
from source.files.ownership import (
    LOCK_FILE,
    FolderInUse,
    FolderLock,
    LocksUnsupported,
    create_owned_folder,
    hold_folder,
    is_held,
    read_holder,
)
from source.files.writable import check_writable_folder

__all__ = [
    "LOCK_FILE",
    "PARTIAL_SUFFIX",
    "FolderInUse",
    "FolderLock",
    "LocksUnsupported",
    "check_writable_folder",
    "create_owned_folder",
    "hold_folder",
    "is_held",
    "open_for_append",
    "read_holder",
    "remove_partial_files",
    "replace_atomically",
    "write_text_atomically",
]
