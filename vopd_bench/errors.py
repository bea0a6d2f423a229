"""The two kinds of failure vopd distinguishes, and the translation of a failed write into the first kind.

A `VopdError` stops the run: the CLI prints its message as one line and exits non-zero.
A `SampleError` concerns one sample: it is recorded in samples.jsonl with its reason and the run goes on.

A run that cannot write its outputs (a full disk, a quota, a read-only folder) stops with one line naming the
folder and what to do (`writing_to`), never a traceback. Every command writes its outputs so that a rerun
resumes (records appended and fsynced batch by batch, states swapped in by rename), so the advice is to make room
and rerun.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class VopdError(Exception):
    """A run-level error whose message is fit to show the user as is."""


class SampleError(VopdError):
    """A problem with a single sample (bad row, corrupt image, invalid box)."""


# errno values only a write raises: wherever they come from, the disk (or the user's quota) is full.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def write_error(e: BaseException, folder: str | Path | None = None, *, resumes: bool = True) -> VopdError | None:
    """The one-line error for `e` when it is a failed write, else None (the exception means something else).

    A failed write is an OSError of a full disk or quota (from `write`, `flush` or `fsync` it names no file), an
    OSError on a file inside `folder` (the run's output folder), or safetensors' own `SafetensorError`, which
    wraps the I/O error in its message instead of raising an OSError."""
    folder = Path(folder) if folder is not None else None
    if isinstance(e, OSError):
        name = Path(e.filename) if isinstance(e.filename, (str, Path)) else None
        inside = name is not None and folder is not None and _is_inside(name, folder)
        if e.errno not in _FULL and not inside:
            return None
        full, reason = e.errno in _FULL, e.strerror or str(e)
    elif type(e).__name__ == "SafetensorError" and "I/O error:" in str(e):
        name, inside = None, False
        reason = str(e).split("I/O error:", 1)[1].split(" (os error", 1)[0].strip()
        full = "space" in reason or "quota" in reason
    else:
        return None
    if folder is None or (name is not None and not inside):  # a file somewhere else than the output folder
        target, fix = (str(name) if name is not None else "a file"), "Free some space" if full else "Check that it can be written"
    else:
        target = f"{folder}" + (f" ({name.absolute().relative_to(folder.absolute())})" if name is not None else "")
        fix = ("Free some space or move the folder to a disk with room" if full
               else "Make the folder writable or choose another")
    then = "rerun the same command to resume; work already saved is kept" if resumes else "rerun the command"
    return VopdError(f"cannot write to {target}: {reason}. {fix}, then {then}")


@contextmanager
def writing_to(folder: str | Path, *, resumes: bool = True) -> Iterator[None]:
    """Within this block, a failed write (see `write_error`) is raised as one VopdError naming `folder`; every
    other exception passes unchanged."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - filtered: anything but a failed write is re-raised as it is
        err = write_error(e, folder, resumes=resumes)
        if err is None:
            raise
        raise err from None


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.absolute().relative_to(folder.absolute())
        return True
    except ValueError:
        return False

