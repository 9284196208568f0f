"""One writer per run directory: the lock a training command holds on `<run_dir>/.lock`.

A second `llmctl pretrain`, `sft`, `--resume` or `--overwrite` on a run that another process
is still training would interleave logs and metrics and race on checkpoints, so every
command that writes a run directory holds this lock for its whole life and a second one is
refused before it changes anything, naming the holder.

The lock is `flock(LOCK_EX | LOCK_NB)` on `.lock`: the kernel drops it when the holder dies
(kill -9, OOM killer), so a dead run never blocks the next one. The file also records who
holds it (pid, host, start time, command) for the refusal message, and for a takeover note
when the holder died without clearing it. Without flock (some network filesystems; Windows)
the record alone decides: a live process on this host keeps it, a dead one is taken over,
and one that cannot be checked (on another host; any on Windows) keeps it until the file is
deleted by hand.

Releasing clears the record and keeps the (empty) file: unlinking a flocked file races with
a process that has it open and would then lock a file no longer in the directory. Only a
directory that holds nothing but the lock (the command failed before writing anything)
loses the file, and the folders too if this command created them; acquiring re-checks that
the path still names the file it locked, so that unlink is safe.

Under `torchrun` only rank 0, the rank that writes, takes the lock. A process that already
holds a run's lock may take it again (the pipeline holds its run across its stages).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError
from llmctl.runs import now_iso, process_alive, this_process

try:
    import fcntl
except ImportError:  # Windows: no flock, so the record alone decides
    fcntl = None

LOCK_FILE = ".lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN)


@dataclass
class RunLock:
    """A held run lock (or, on ranks other than 0, a stand-in that holds nothing)."""

    run_dir: Path
    made: tuple[Path, ...] = ()  # folders this command created for the lock, deepest first
    fd: int | None = None
    note: str = ""  # the takeover line, when a dead holder's record was replaced
    depth: int = 1  # times this process has taken it (the pipeline, then its stage)

    @property
    def existed(self) -> bool:
        """Whether the run directory was there before this command."""
        return not self.made


_HELD: dict[Path, RunLock] = {}  # the locks this process holds, by resolved run directory


def held(run_dir: Path) -> RunLock | None:
    """The lock this process holds on `run_dir`, if any."""
    return _HELD.get(Path(run_dir).resolve())


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


# --------------------------------------------------------------------------- the record

def read_record(fd: int) -> dict[str, Any] | None:
    """The holder record in an open lock file; None when empty or unreadable (being written)."""
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record, indent=1).encode("utf-8") + b"\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)  # a network filesystem's other clients read the record, not our page cache


def describe(record: dict[str, Any] | None) -> str:
    """`llmctl pretrain (pid 1234 on host X, started 2026-12-05 12:30:01)`, from a record."""
    if not record:
        return "another llmctl process (it has not written its details yet)"
    started = str(record.get("started_at", "?"))
    with contextlib.suppress(ValueError):
        started = datetime.datetime.fromisoformat(started).strftime("%Y-%m-%d %H:%M:%S")
    return (f"llmctl {record.get('command', '?')} (pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"started {started})")


def in_use(run_dir: Path, record: dict[str, Any] | None) -> LlmctlError:
    return LlmctlError(f"{run_dir} is in use by {describe(record)}; wait for it to finish or stop it, "
                       f"or choose another --run-name")


def judge_record(record: dict[str, Any] | None, alive: bool | None) -> str:
    """Without flock, whether a record lets us in: "free" (none), "dead" (its process is gone:
    take over), "alive" (refuse), "unknown" (another host: refuse until deleted by hand)."""
    if not record:
        return "free"
    return {True: "alive", False: "dead", None: "unknown"}[alive]


def _alive(record: dict[str, Any]) -> bool | None:
    """Whether the record's process runs (None: cannot tell, e.g. another host)."""
    if os.name == "nt":
        return None  # os.kill(pid, 0) would signal the process there, not probe it
    return process_alive(record)


def takeover_note(record: dict[str, Any], alive: bool | None) -> str:
    why = "which is no longer running" if alive is False else "which no longer holds it"
    return f"took over the run lock of {describe(record)}, {why}"


# --------------------------------------------------------------------------- acquire and release

def _open_locked(path: Path, run_dir: Path) -> tuple[int, bool, dict[str, Any] | None]:
    """Open and flock the lock file; returns (fd, flock worked, the record found there).

    A releasing process may unlink the file (and rmdir the folder) between our open and our
    flock: then the path no longer names what we locked, and we try again."""
    for _ in range(20):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            continue  # the folder was removed after our mkdir
        except OSError as e:
            raise LlmctlError(f"cannot create the run lock {path}: {e.strerror}; check that run.output_dir "
                              f"is a folder you can write to") from None
        locked = False  # no flock (Windows; ENOLCK, EOPNOTSUPP on some network filesystems): the record decides
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError as e:
                if e.errno in _BUSY:
                    record = read_record(fd)
                    os.close(fd)
                    raise in_use(run_dir, record) from None
        try:
            st, mine = os.stat(path), os.fstat(fd)
            same = (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)
        except FileNotFoundError:
            same = False
        if same:
            return fd, locked, read_record(fd)
        os.close(fd)
    raise LlmctlError(f"could not lock {path}: it keeps being replaced; check that no other tool is "
                      f"deleting {run_dir}, then try again")


def acquire(run_dir: Path, command: str) -> RunLock:
    """Lock `run_dir` for this process (creating the folder), or raise the one-line refusal."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD:
        _HELD[key].depth += 1
        return _HELD[key]
    made = _missing_folders(run_dir)
    path = run_dir / LOCK_FILE
    try:
        fd, locked, record = _open_locked(path, run_dir)
    except BaseException:
        _remove_folders(made)  # only empty ones go: a holder's folder has its lock in it
        raise
    if record and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
        record = None  # this process's own record (released without clearing): nothing to announce
    alive = _alive(record) if record else None
    if not locked:  # best effort: two starts that read an empty record at the same instant both go on
        verdict = judge_record(record, alive)
        if verdict in ("alive", "unknown"):
            os.close(fd)  # the holder's file and folder stay as they are
        if verdict == "alive":
            raise in_use(run_dir, record)
        if verdict == "unknown":
            raise LlmctlError(f"{run_dir} is in use by {describe(record)} according to {path}; without file "
                              f"locks here, llmctl cannot check that process from this machine: if it is "
                              f"really gone, delete {path} and try again")
    mine = {**this_process(), "started_at": now_iso(), "command": command}
    try:
        _write_record(fd, mine)
    except BaseException:
        os.close(fd)
        _remove_if_only_lock(run_dir, made)
        raise
    lock = RunLock(run_dir, made, fd, note=takeover_note(record, alive) if record else "")
    _HELD[key] = lock
    return lock


def _only_lock(run_dir: Path) -> bool:
    try:
        return [p.name for p in run_dir.iterdir()] == [LOCK_FILE]
    except OSError:
        return False


def _missing_folders(run_dir: Path) -> tuple[Path, ...]:
    """The run directory and those of its parents that do not exist yet, deepest first."""
    missing = []
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            break
        missing.append(folder)
    return tuple(missing)


def _remove_folders(made: tuple[Path, ...]) -> None:
    """Remove the folders this command made, deepest first, while they are empty."""
    for folder in made:
        try:
            folder.rmdir()  # fails, as it should, when anything else is in it (another run, say)
        except OSError:
            return


def _remove_if_only_lock(run_dir: Path, made: tuple[Path, ...]) -> None:
    """Leave no trace of a command that wrote nothing: the lock file, and the folders it made."""
    if _only_lock(run_dir):
        with contextlib.suppress(OSError):
            (run_dir / LOCK_FILE).unlink()
    _remove_folders(made)


def release(lock: RunLock) -> None:
    """Give the lock up: clear the record (or remove the lock, if it is all this command left)."""
    if lock.fd is None:
        return
    lock.depth -= 1
    if lock.depth > 0:
        return
    _HELD.pop(lock.run_dir.resolve(), None)
    fd, lock.fd = lock.fd, None
    try:
        if _only_lock(lock.run_dir):
            with contextlib.suppress(OSError):
                (lock.run_dir / LOCK_FILE).unlink()  # still flocked: a racing opener re-checks the path
        else:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
    _remove_folders(lock.made)


@contextlib.contextmanager
def hold_run_lock(run_dir: Path, command: str, say: Callable[[str], None] | None = None) -> Iterator[RunLock]:
    """Hold `run_dir`'s lock for the block (rank 0 only); `say` gets the takeover line, if any."""
    run_dir = Path(run_dir)
    if not is_rank0():
        yield RunLock(run_dir, _missing_folders(run_dir))  # holds nothing: rank 0 writes, and locks, for the job
        return
    lock = acquire(run_dir, command)
    try:
        if lock.note and lock.depth == 1 and say is not None:
            say(lock.note)
        yield lock
    finally:
        release(lock)


def keep_lock_only(run_dir: Path) -> None:
    """Empty `run_dir` for `--overwrite`, keeping the lock file this process holds."""
    for child in run_dir.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
