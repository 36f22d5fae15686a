"""scripts/cpu_share.py: the CPU each thread of a command's process tree used, per busy phase."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# a parent that waits, and a child that spins one thread for a few seconds
SPIN = "import time; t = time.time()\nwhile time.time() - t < 7: pass"
PARENT = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {SPIN!r}])"


def test_a_childs_spinning_thread_is_the_phase(tmp_path: Path) -> None:
    out = tmp_path / "share.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "cpu_share.py"), "--threshold", "0.5", "--json", str(out)]
    res = subprocess.run([*cmd, "--", sys.executable, "-c", PARENT], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    phases = json.loads(out.read_text())
    assert len(phases) == 1, res.stdout
    phase = phases[0]
    assert "time.time()" in phase["process"]  # the child, not the parent
    top = phase["threads"][0]
    assert top["cores"] > 0.5 and top["cores"] <= phase["tree_cores"] + 1e-6
    assert phase["machine_cores"] >= top["cores"] - 0.1  # the machine's busy time includes it
