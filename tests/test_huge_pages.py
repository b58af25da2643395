"""torch's large CPU allocations are backed by transparent huge pages once the package is
imported (fewer page faults, faster decode and training on the small CPUs this runs on)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from character_training.backends.local.settings import transparent_hugepage_mode

# A fresh interpreter, so that nothing imported torch (and allocated) before the package:
# where the 8 MB tensor lives, and whether the kernel may back that mapping with huge pages.
_PROBE = """
import json, sys
import character_training, torch
from character_training.backends.local import LocalEngineConfig
from character_training.backends.local.settings import runtime_info
tensor = torch.ones((8 << 20) // 4)
address, mapping = tensor.data_ptr(), {}
inside = False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and ":" not in head:
        low, high = (int(x, 16) for x in head.split("-"))
        inside = low <= address < high
    elif inside and line.startswith("THPeligible"):
        mapping["eligible"] = line.split()[1]
info = runtime_info(LocalEngineConfig(precision="fp32"))
print(json.dumps({"mapping": mapping, "env": info["env"], "mode": info["transparent_hugepage"]}))
"""


@pytest.mark.skipif(transparent_hugepage_mode() != "madvise", reason="needs THP mode madvise")
def test_large_tensors_are_eligible_for_huge_pages_and_the_setting_is_recorded():
    env = {"PATH": "/usr/bin:/bin"}  # no THP_MEM_ALLOC_ENABLE from the caller's shell
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    # in madvise mode only mappings torch asked for are eligible: without the package's
    # setting this reads "0"
    assert probe["mapping"] == {"eligible": "1"}
    assert probe["env"]["THP_MEM_ALLOC_ENABLE"] == "1"
    assert probe["mode"] == "madvise"


def test_the_mode_is_read_from_the_bracketed_word(tmp_path):
    enabled = tmp_path / "enabled"
    enabled.write_text("always madvise [never]\n")
    assert transparent_hugepage_mode(enabled) == "never"
    assert transparent_hugepage_mode(tmp_path / "missing") is None
