"""`tandem bench offline` smoke test (no timing assertions) and workload reproducibility."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from service.bench.workloads import NAMES, make

BIN = Path(sys.executable).parent


def test_workloads_are_reproducible_and_shaped() -> None:
    for name in NAMES:
        a, b = make(name, 512, seed=0), make(name, 512, seed=0)
        assert a == b and a.prompts != make(name, 512, seed=1).prompts
        assert all(4 <= t < 512 for p in a.prompts for t in p)
    offline = make("offline", 32000)
    assert len(offline.prompts) == 128
    assert min(map(len, offline.prompts)) >= 16 and max(map(len, offline.prompts)) <= 512
    assert 16 <= min(offline.output_lens) and max(offline.output_lens) <= 256
    shared = make("shared-prefix", 512)
    assert len({tuple(p[:384]) for p in shared.prompts}) == 1


def test_bench_offline_small_writes_well_formed_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    res = subprocess.run([str(BIN / "tandem"), "bench", "offline", "--model", "tiny-llama", "--workload",
                          "offline-small", "--peers", "hf-fifo", "hf-static", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["workload"]["name"] == "offline-small" and report["environment"]["torch"]
    systems = [r["system"] for r in report["results"]]
    assert systems[:4] == ["tandem fcfs", "tandem prefill-priority", "tandem async-overlap:fcfs",
                           "tandem async-overlap:prefill-priority"]
    for r in report["results"]:
        assert r["error"] is None, r
        assert r["output_tokens"] > 0 and r["tokens_per_s"] > 0
