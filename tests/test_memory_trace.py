"""The opt-in memory tracer names the code that was running at a new peak."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from character_training import memory_trace

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/statm").is_file(), reason="reads /proc/self/statm (Linux)"
)


def test_a_new_peak_is_logged_with_the_frame_that_allocated_it(tmp_path):
    """A fresh interpreter with the variable set imports the package, which starts the
    sampler; the child counts its own script as "the package" and fills 200 MB in small steps
    inside ``fill``, pausing so that the sampler thread runs even on a busy CPU (without the
    pauses a loaded CI machine logged only 125 MB of the rise before the child exited)."""
    trace = tmp_path / "memory.tsv"
    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent(
            f"""
            import time

            import character_training
            from character_training import memory_trace

            memory_trace._PACKAGE_DIR = {str(tmp_path)!r}

            def fill():
                blocks = []
                for i in range(200):
                    blocks.append(bytearray(2**20))  # touched: resident at once
                    if i % 10 == 9:
                        time.sleep(0.02)  # the GIL is free: the sampler sees the rise
                time.sleep(0.5)  # and the top, on a loaded CPU too, before fill returns
                return blocks

            held = fill()
            """
        )
    )
    env = {**os.environ, memory_trace.ENV_VARIABLE: str(trace)}
    subprocess.run([sys.executable, str(child)], env=env, check=True, timeout=120)
    rows = [line.split("\t") for line in trace.read_text().splitlines()]
    assert rows and all(len(r) == 4 for r in rows)
    assert len({r[0] for r in rows}) == 1 and rows[0][0] != str(os.getpid())  # the child's
    rss = [int(r[2]) for r in rows]
    assert rss == sorted(rss) and rss[-1] - rss[0] >= 150  # the 200 MB seen rising
    rising = [r[3] for r in rows if int(r[2]) > rss[0] + 50]
    assert rising and all(w.startswith("child.py:") and ":fill" in w for w in rising), rising


def test_nothing_starts_without_the_variable(monkeypatch):
    monkeypatch.delenv(memory_trace.ENV_VARIABLE, raising=False)
    assert memory_trace.start_from_environment() is False
