"""A base commit against the working tree, alternated on one workload in one invocation.

    .venv/bin/python scripts/perf_guard.py                      # HEAD vs the working tree
    .venv/bin/python scripts/perf_guard.py --base main~3 --rounds 3 -- \\
        --model bench-llama --workload offline-small --systems fcfs async-overlap:fcfs
    .venv/bin/python scripts/perf_guard.py --serve          # through gRPC (`tandem bench serve`)

Run it before landing anything that touches the hot path. Everything after `--` goes to
`tandem bench offline` (default: bench-llama, the `offline-small` workload, fcfs and
async-overlap:fcfs, no transformers peers), or with `--serve` to `tandem bench serve` (default:
bench-llama, the `offline` workload's first 64 requests at 64 in flight, fcfs). The base is
checked out into a temporary git worktree and imported from there (PYTHONPATH), the tree under
test from this checkout; the two run alternately (base, tree, base, tree, ...) so the machine's drift lands on both. It
prints each system's output tokens/s per round and the median ratio tree / base.
NOTE: ratios of one invocation only; on a shared machine single runs move by several percent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BENCH = ["--model", "bench-llama", "--workload", "offline-small", "--systems", "fcfs", "async-overlap:fcfs"]
DEFAULT_SERVE = ["--model", "bench-llama", "--workload", "offline", "--requests", "64", "--concurrency", "64"]


def run(tree: Path, bench: list[str], out: Path, serve: bool) -> dict[str, float]:
    """One benchmark with `tree` first on the path; output tokens/s per system."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    mode = ["serve"] if serve else ["offline", "--peers"]
    cmd = [sys.executable, "-m", "tandem.service.cli", "bench", *mode, *bench, "--json", str(out)]
    subprocess.run(cmd, env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    if serve:  # the workload's servers, each with its runs
        servers = report["servers"]
        return {s["label"]: statistics.median(r["output_throughput"] for r in s["runs"]) for s in servers}
    return {r["system"]: r["tokens_per_s"] for r in report["results"] if r.get("tokens_per_s")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD", help="the commit to compare against (default: HEAD)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of base and tree (default: 2)")
    p.add_argument("--serve", action="store_true", help="through gRPC: `tandem bench serve` (local servers)")
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- then `tandem bench offline|serve` arguments")
    args = p.parse_args()
    bench = [a for a in args.bench if a != "--"] or (DEFAULT_SERVE if args.serve else DEFAULT_BENCH)
    figures: dict[str, dict[str, list[float]]] = {"base": {}, "tree": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), args.base], check=True)
        try:
            for i in range(args.rounds):
                for side, tree in (("base", base), ("tree", ROOT)):
                    got = run(tree, bench, Path(tmp) / f"{side}{i}.json", args.serve)
                    for system, tps in got.items():
                        figures[side].setdefault(system, []).append(tps)
                    print(f"round {i + 1} {side}: " + ", ".join(f"{s} {t:.1f}" for s, t in got.items()), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    print(f"\n{'system':<36}{'base tok/s':>12}{'tree tok/s':>12}{'tree/base':>11}")
    for system, base_runs in figures["base"].items():
        tree_runs = figures["tree"].get(system, [])
        if not tree_runs:
            continue
        b, t = statistics.median(base_runs), statistics.median(tree_runs)
        print(f"{system:<36}{b:>12.1f}{t:>12.1f}{t / b:>11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
