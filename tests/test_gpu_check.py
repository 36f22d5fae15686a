"""The GPU validation script keeps working: its CPU dry pass runs in CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_pass(tmp_path) -> None:
    out = tmp_path / "gpu_check.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--repeats", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.read_text())
    assert report["sync_async_identical"] is True
    assert report["greedy_matches_reference"] is True
    systems = {(r["system"], r["batch"]) for r in report["rows"]}
    want = {("tandem fcfs (c++)", 4), ("tandem async-overlap (c++)", 8), ("tandem fcfs (gather)", 8)}
    assert want | {("transformers generate_batch", 8)} <= systems
    assert report["presets_match"] is True and set(report["presets"]) == {"tiny-llama", "tiny-qwen3"}
    for row in report["rows"]:
        if row["system"].startswith("tandem"):
            assert row["tokens_per_s"] > 0 and 0 <= row["idle_fraction"] < 1 and row["step_ms"] > 0
            assert row["mismatches"] == 0  # against the float32 reference, near-ties allowed
            assert row["repeats_identical"] and len(row["runs_tokens_per_s"]) == 2


def test_host_profile_runs_rounds_on_one_engine() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "host_profile.py"), "--batch", "4", "--new", "8", "--rounds", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rounds = [line for line in res.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2 and all("steps" in r and "idle" in r for r in rounds), res.stdout
