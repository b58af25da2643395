"""One chain at a time per run folder: the lock file ``runs/<persona>/<size>/running.lock``.

Two runner processes working on the same persona x size would write the same stage folders at
once (interleaved JSONL, one overwriting the other's checkpoint pointers), so the runner takes
this lock before a chain's first notebook and holds it until the chain's last one finished. A
second process (or a second matrix in the same process) that wants the chain gets one line:
the lock file, the pid holding it and the stage it is running.

The kernel's advisory lock (``flock``) decides who holds it, not the file's existence: a
process that dies, however it dies, drops its lock, so a lock file left by a dead pid is simply
taken over by the next run, which logs that it did. The JSON inside (pid, host, chain, stage,
since) is what the refusal message and the index show; it is rewritten as the chain moves from
stage to stage. Released locks delete their file.

POSIX only (``fcntl``), like the rest of the kit's process handling; an ``flock`` on NFS is
emulated by the kernel with byte-range locks and still works across machines.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CharacterTrainingError

logger = logging.getLogger(__name__)

LOCK_FILE = "running.lock"
PROBE_TRIES = 4  # attempts to take a lock before refusing (see `_lock_soon`)
PROBE_WAIT_S = 0.05


class LockHeld(CharacterTrainingError, RuntimeError):
    """Another process (or another matrix in this one) is running the chain."""


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder (fields may be missing in a torn file)."""

    pid: int | None
    host: str
    chain: str
    stage: str
    since: float | None

    @classmethod
    def read(cls, path: Path) -> LockInfo | None:
        """The holder recorded in ``path``; None when there is no file, empty fields when it
        cannot be parsed (a holder caught in the middle of rewriting it)."""
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError):
            return None
        try:
            record = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            record = {}
        if not isinstance(record, dict):
            record = {}
        pid = record.get("pid")
        since = record.get("since")
        return cls(
            pid=pid if isinstance(pid, int) else None,
            host=str(record.get("host", "")),
            chain=str(record.get("chain", "")),
            stage=str(record.get("stage", "")),
            since=float(since) if isinstance(since, (int, float)) else None,
        )

    def describe(self) -> str:
        """``pid 1234 on host (stage 03_dpo, since 2026-12-04 22:40 UTC)``."""
        who = f"pid {self.pid}" if self.pid is not None else "an unknown pid"
        if self.host and self.host != socket.gethostname():
            who += f" on {self.host}"
        details = [f"stage {self.stage}" if self.stage else "between stages"]
        if self.since is not None:
            details.append("since " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.since)))
        return f"{who} ({', '.join(details)})"


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this id exists on this machine (a zombie counts as alive)."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_FILE


def holder(run_dir: Path) -> LockInfo | None:
    """The process running this chain now, or None (no lock file, or nobody holds it).

    Used by the index; it asks the kernel whether the lock is held, so a file left by a
    crashed run does not show the chain as running."""
    path = lock_path(run_dir)
    info = LockInfo.read(path)
    if info is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        # a shared probe: it conflicts with a holder, not with other readers
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return info
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock_soon(fd: int, tries: int = PROBE_TRIES) -> bool:
    """Take the exclusive lock, allowing a few short waits: `holder` (the index, the spend
    ledger) probes it for microseconds, and a probe must not make a run refuse."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(PROBE_WAIT_S)
    return False


class ChainLock:
    """The lock of one run folder; `acquire` raises `LockHeld` in one line when it is taken."""

    def __init__(self, run_dir: Path, chain: str):
        self.path = lock_path(run_dir)
        self.chain = chain
        self._fd: int | None = None
        self._since = 0.0
        self.took_over: LockInfo | None = None  # the dead holder whose file was taken over

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> ChainLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _lock_soon(fd):
                os.close(fd)
                raise LockHeld(self._refusal())
            # the holder may have released (and deleted) the file between our open and our
            # lock: then we hold a lock on a deleted file, and must try the new one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left = LockInfo.read(self.path)
        if left is not None and left.pid is not None:
            self.took_over = left
            why = (
                "which no longer holds it (the pid was reused)"
                if pid_alive(left.pid) and left.pid != os.getpid()
                else "which is no longer running"
            )
            logger.warning("%s: taking over the lock of %s, %s", self.path, left.describe(), why)
        self._fd = fd
        self._since = time.time()
        self.set_stage("")
        return self

    def _refusal(self) -> str:
        info = LockInfo.read(self.path)
        holder_text = info.describe() if info is not None else "another process"
        mine = info is not None and info.pid == os.getpid()
        hint = (
            "this process already runs it (a chain listed twice, or two matrices in one process)"
            if mine
            else "wait for it to finish or stop that process; a lock whose process has died "
            "is taken over automatically"
        )
        return f"{self.path}: chain {self.chain} is already being run by {holder_text}; {hint}"

    def set_stage(self, stage: str) -> None:
        """Record the stage now running (what a refused process and the index show)."""
        if self._fd is None:
            return
        record: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "chain": self.chain,
            "stage": stage,
            "since": self._since,
        }
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Delete the file, then drop the lock (in that order: nobody locks a file that is
        about to disappear and believes it holds the chain)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ChainLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
