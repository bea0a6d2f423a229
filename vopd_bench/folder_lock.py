"""One writer per output folder: an OS file lock that `gap-report` holds on its `--out` and `distill` on its.

The lock is `fcntl.flock` on `<folder>/.vopd.lock`. The kernel drops it when the holding process ends in any way,
SIGKILL included, so a crashed run never leaves a stale lock behind. The file records who holds the lock (pid,
command, torchrun job), so a refused run can name it.

A run that fails before it wrote anything (a model or benchmark that does not exist) removes its lock file, and
the folders it created for it, so it leaves no empty output folder behind. A process that opened the lock file
just before it was removed would then hold a lock on a file no longer in the folder: so a lock counts only when
the path still names the locked file, and is otherwise taken again.

torchrun: the ranks of one job share the folder by design. Rank 0 takes the lock for the whole job and records
the job's identity (its rendezvous id and master address); every other rank waits until the lock is held under
its own job's identity, and is refused otherwise. So a second job is refused on every rank, and a rank never
writes into a folder its own rank 0 does not hold. (Locks on network file systems are only as good as the
file system's flock.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from vopd_bench.errors import VopdError

LOCK_NAME = ".vopd.lock"
RANK_WAIT_S = 120.0  # how long a rank > 0 waits for its rank 0 to take the lock


def torchrun_job(env: Mapping[str, str] = os.environ) -> tuple[int, str] | None:
    """(global rank, job identity) inside a torchrun job of several processes, else None.

    TORCHELASTIC_RUN_ID alone is not unique (it defaults to "none" without --rdzv-id); two jobs running at the
    same time cannot share a master address and port, so the pair is."""
    try:
        world, rank = int(env.get("WORLD_SIZE", "1")), int(env["RANK"])
    except (KeyError, ValueError):
        return None
    if world <= 1:
        return None
    job = f"{env.get('TORCHELASTIC_RUN_ID', '?')}@{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    return rank, job


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536) or b"{}")
    except (OSError, ValueError):
        return {}


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _open(folder: Path, path: Path) -> int:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise VopdError(f"cannot write to the output folder {folder}: {e.strerror or e}") from None


def _still_there(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (a failed run removes its lock file as it gives up)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _missing(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    out = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        out.append(p)
    return out


def _remove_if_unused(path: Path, created: list[Path]) -> None:
    """After a failed run: the lock file and the folders this run created, if the run wrote nothing else."""
    try:
        if [p.name for p in path.parent.iterdir()] != [LOCK_NAME]:
            return
        path.unlink()
        for folder in created:
            folder.rmdir()
    except OSError:  # something else appeared there meanwhile: leave it
        pass


@contextmanager
def output_lock(folder: str | Path, *, env: Mapping[str, str] = os.environ,
                rank_wait_s: float = RANK_WAIT_S) -> Iterator[Path]:
    """Hold `folder` for this run (creating it); raise VopdError naming the holder if another run has it.
    A run that fails with nothing written leaves no folder behind (module docstring)."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    job = torchrun_job(env)
    created = _missing(folder)
    fd = _open(folder, path)
    try:
        if job is not None and job[0] != 0:
            _join_job(fd, folder, job[1], rank_wait_s)
            yield path  # rank 0 holds the lock for the job; this rank only checked that it is its own job's
            return
        while True:
            # A waiting torchrun rank probes the lock for a moment now and then: retry briefly before refusing.
            for _ in range(5):
                if _try_lock(fd):
                    break
                time.sleep(0.05)
            else:
                raise _busy(folder, _holder(fd))
            if _still_there(fd, path):
                break
            os.close(fd)  # its holder removed it as it failed: lock the folder afresh
            fd = _open(folder, path)
        me = {"pid": os.getpid(), "command": " ".join(sys.argv), "job": job[1] if job else None,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        try:
            yield path
        except BaseException:
            _remove_if_unused(path, created)  # still locked: nobody else is writing there
            raise
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _busy(folder: Path, holder: dict) -> VopdError:
    who = f"pid {holder['pid']}: {holder.get('command') or '?'}" if holder.get("pid") else "another process"
    return VopdError(f"{folder} is in use by another vopd run ({who}); wait for it to finish or choose another --out")


def _join_job(fd: int, folder: Path, job: str, wait_s: float) -> None:
    """A rank > 0: wait until the folder is locked under this torchrun job, and refuse any other holder.

    The holder writes its identity just after locking, so a mismatch counts only when seen twice in a row."""
    deadline = time.monotonic() + wait_s
    mismatches = 0
    while True:
        if _try_lock(fd):  # nobody holds it (rank 0 has not started yet): let go again at once
            fcntl.flock(fd, fcntl.LOCK_UN)
            mismatches = 0
        else:
            holder = _holder(fd)
            if holder.get("job") == job:
                return
            mismatches = mismatches + 1 if holder.get("pid") else 0
            if mismatches >= 2:
                raise _busy(folder, holder)
        if time.monotonic() > deadline:
            raise VopdError(f"{folder}: rank 0 of this torchrun job did not take the output lock within {wait_s:g} s")
        time.sleep(0.1)
