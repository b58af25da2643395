"""Where a process's memory peaks: a background sampler of resident memory that logs each new
high-water mark with the package code that was running at that moment.

Why: a peak lasting a fraction of a second is invisible to an outside poller (twice a second
missed it for two sessions) and `getrusage` gives only its size. The run's peak was a decode
wave copying its KV cache (`fast_decode.StaticCache.compact` now moves rows in place); a 5 ms
sampler inside the kernel named the function at once. Set ``CHARACTER_TRAINING_MEMORY_TRACE``
to a file path before the package is imported (the runner's kernels inherit the environment):

    CHARACTER_TRAINING_MEMORY_TRACE=/tmp/memory.tsv make reproduce

Every process that imports the package appends tab-separated rows ``pid, seconds since
start, resident MiB, where``, one per rise of the peak by at least ``step_mib``. ``where``
lists the innermost frames of this package (``file:line:function``, innermost first) of the
thread that was deepest in it. Linux only (``/proc/self/statm``); elsewhere it does nothing.
Reading ``statm`` and, on a new peak, the threads' frames costs well under 1% of a core.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

ENV_VARIABLE = "CHARACTER_TRAINING_MEMORY_TRACE"
_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_started = False


def start_from_environment() -> bool:
    """Start the sampler when `ENV_VARIABLE` names a file; True if it runs."""
    path = os.environ.get(ENV_VARIABLE, "").strip()
    return start(Path(path)) if path else False


def start(path: Path, interval_s: float = 0.005, step_mib: int = 16) -> bool:
    """Sample resident memory every ``interval_s`` in a daemon thread and append a row to
    ``path`` at each new peak (``step_mib`` above the last logged one). Once per process."""
    global _started
    if _started or not Path("/proc/self/statm").is_file():
        return False
    _started = True
    page = os.sysconf("SC_PAGE_SIZE")
    began = time.monotonic()
    thread = threading.Thread(
        target=_sample, args=(path, interval_s, step_mib, page, began), daemon=True
    )
    thread.start()
    return True


def _sample(path: Path, interval_s: float, step_mib: int, page: int, began: float) -> None:
    logged = 0
    with open("/proc/self/statm", "rb", buffering=0) as statm:
        while True:
            statm.seek(0)
            rss_mib = int(statm.read(128).split()[1]) * page >> 20
            if rss_mib >= logged + step_mib:
                logged = rss_mib
                row = f"{os.getpid()}\t{time.monotonic() - began:.3f}\t{rss_mib}\t{where()}\n"
                with open(path, "a", encoding="utf-8") as out:
                    out.write(row)
            time.sleep(interval_s)


def where(depth: int = 8) -> str:
    """The innermost ``depth`` frames of this package, innermost first, of the thread deepest
    in the package (the sampler's own thread excluded); "" when no thread is in it."""
    best: list[str] = []
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        names: list[str] = []
        while frame is not None:
            code = frame.f_code
            if code.co_filename.startswith(_PACKAGE_DIR):
                name = os.path.relpath(code.co_filename, _PACKAGE_DIR)
                names.append(f"{name}:{frame.f_lineno}:{code.co_name}")
            frame = frame.f_back
        if len(names) > len(best):
            best = names
    return " < ".join(best[:depth])
