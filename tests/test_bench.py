"""`tandem bench offline` smoke test (no timing assertions) and workload reproducibility."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.bench.workloads import NAMES, make

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


def test_bench_offline_small_writes_well_formed_json_and_plots(tmp_path) -> None:
    out, plots = tmp_path / "bench.json", tmp_path / "plots"
    res = subprocess.run(
        [
            str(BIN / "tandem"),
            "bench",
            "offline",
            "--model",
            "tiny-llama",
            "--workload",
            "offline-small",
            "--peers",
            "hf-fifo",
            "hf-static",
            "--static-batch",
            "4",
            "8",
            "--no-tune",
            "--json",
            str(out),
            "--plots",
            str(plots),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["workload"]["name"] == "offline-small" and report["environment"]["torch"]
    systems = [r["system"] for r in report["results"]]
    assert systems == [
        "tandem fcfs",
        "tandem prefill-priority",
        "tandem async-overlap:fcfs",
        "tandem async-overlap:prefill-priority",
        "transformers generate_batch fifo",
        "transformers generate (static, batch 4)",
        "transformers generate (static, batch 8)",
    ]
    for r in report["results"]:
        assert r["error"] is None, r
        # every system generates exactly the workload's lengths
        assert r["output_tokens"] == report["workload"]["output_tokens"] and r["tokens_per_s"] > 0
    util = report["results"][0]["extra"]["utilisation"]
    assert util["roofline_flops"] > 0 and 0 < util["fraction"] and util["steps"] > 0
    # The memory side: a step takes at least its matmuls at the roofline plus its K/V at the read bandwidth.
    assert util["read_bandwidth"] > 0 and util["kv_bytes"] > 0 and util["weight_bytes"] > 0
    assert 0 < util["limit_seconds"] <= util["step_seconds"] and util["fraction"] < util["ceiling"]
    assert "best tandem / best generate_batch" in res.stdout
    png = (plots / "offline_offline-small_throughput.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_generate_batch_tuning_picks_the_fastest_setting() -> None:
    from tandem.bench.offline import _hf_model, tune_hf
    from tandem.engine.model.loader import resolve_path

    model = _hf_model(resolve_path("tiny-llama"), "cpu", None)
    work = make("offline-small", model.config.vocab_size)
    grid = [{}, dict(max_batch_tokens=64, max_requests_per_batch=2)]
    best, trials = tune_hf(model, work, "fifo", grid, tune_requests=3)
    assert [t.error for t in trials] == [None, None]
    assert all(t.output_tokens == sum(work.output_lens[:3]) for t in trials)
    assert best is max(trials, key=lambda t: t.tokens_per_s)


def test_bench_serve_sweep_against_local_server(tmp_path) -> None:
    out, plots = tmp_path / "serve.json", tmp_path / "plots"
    res = subprocess.run(
        [
            str(BIN / "tandem"),
            "bench",
            "serve",
            "--model",
            "tiny-llama",
            "--workload",
            "offline-small",
            "--rate",
            "20",
            "inf",
            "--concurrency",
            "3",
            "--goodput",
            "ttft:60000",
            "tpot:60000",
            "--json",
            str(out),
            "--plots",
            str(plots),
            "--offline-baseline",
            "--repeats",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert [s["label"] for s in report["servers"]] == ["tandem fcfs #1", "tandem fcfs #2"]
    for server in report["servers"]:
        assert server["info"]["scheduler"] == "fcfs" and [r["rate"] for r in server["runs"]] == [20.0, float("inf")]
        for run in server["runs"]:
            assert run["completed"] == server["workload"]["requests"] and not run["errors"]
            assert sum(r["output_tokens"] for r in run["records"]) == server["workload"]["output_tokens"]
            assert 0 < run["ttft_ms"]["p50"] <= run["ttft_ms"]["p99"] <= run["e2e_ms"]["p99"]
            assert run["goodput"]["request_throughput"] == run["request_throughput"]  # SLOs no request can miss
            offline = server["offline"]["output_throughput"]
            assert run["of_offline"] == pytest.approx(run["output_throughput"] / offline)
    for i, rate in enumerate(("20.0", "inf")):  # two rounds: the median is their mean
        ratios = [server["runs"][i]["of_offline"] for server in report["servers"]]
        assert report["of_offline_median"]["fcfs"][rate] == pytest.approx(sum(ratios) / 2)
    assert "/offline" in res.stdout and "median of 2 rounds" in res.stdout
    assert (plots / "serve_offline-small_latency_cdf.png").read_bytes().startswith(b"\x89PNG")
    assert (plots / "serve_offline-small_vs_rate.png").exists() is False  # one finite rate: no curve to draw


def test_bench_serve_offline_baseline_needs_local_servers() -> None:
    res = subprocess.run(
        [str(BIN / "tandem"), "bench", "serve", "--target", "127.0.0.1:1", "--offline-baseline"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "--offline-baseline" in res.stderr


def test_bench_serve_rejects_a_bad_goodput_flag() -> None:
    res = subprocess.run(
        [str(BIN / "tandem"), "bench", "serve", "--target", "127.0.0.1:1", "--goodput", "ttfb:5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "--goodput" in res.stderr


def test_tuned_generate_batch_reports_its_best_whole_workload_trial() -> None:
    from tandem.bench.offline import bench_offline

    grid = [{}, dict(max_batch_tokens=64, max_requests_per_batch=2)]
    report = bench_offline(
        "tiny-llama",
        "offline-small",
        systems=[],
        peers=["hf-fifo"],
        static_batches=[],
        device="cpu",
        dtype_name=None,
        json_path=None,
        progress=lambda msg: None,
        hf_grid=grid,
    )
    [row] = report["results"]
    trials = report["hf_tuning"]["fifo"]
    assert len(trials) == len(grid) and all(t["error"] is None for t in trials)
    assert row["system"] == "transformers generate_batch fifo"
    assert row["tokens_per_s"] == max(t["tokens_per_s"] for t in trials)
    assert row["output_tokens"] == report["workload"]["output_tokens"]


def test_progress_redraws_only_on_a_terminal() -> None:
    import io

    from tandem.bench.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, live in ((io.StringIO(), False), (Terminal(), True)):
        bar = Progress("phase", 4, stream=stream)
        for _ in range(4):
            bar.advance()
        bar.close()
        text = stream.getvalue()
        assert ("\r" in text) is live
        assert "phase" in text and " 4/4 " in text.splitlines()[-1] and text.count("\n") == 1
    assert stream.getvalue().count("\r") >= 2  # the terminal saw it redrawn


def test_bench_serve_gives_each_rate_a_fresh_server() -> None:
    """A server kept across rates would serve later rates from a prefix cache the earlier ones
    warmed: each rate gets its own server (its own port)."""
    from tandem.bench.serve import bench_serve

    report = bench_serve("offline-small", [float("inf"), float("inf")], 4, model="tiny-llama", requests=4)
    [server] = report["servers"]
    assert report["fresh_server_per_rate"] is True
    assert len({run["target"] for run in server["runs"]}) == 2


def test_bench_warm_up_leaves_the_workloads_prefix_cold() -> None:
    """The warm-up must not put a workload prompt's blocks in the cache before timing: on
    shared-prefix the first request then found its 384-token prefix already cached."""
    from tandem.bench.offline import run_tandem

    work = make("shared-prefix", 512, requests=3)
    result = run_tandem("fcfs", "tiny-llama", work, "cpu", None, {})
    assert result.error is None
    assert result.extra["cached_tokens"][0] == 0


def test_generate_batch_search_walks_until_its_best_is_interior() -> None:
    """The search itself, on a known speed surface: from the starting grid (512/2048 tokens x
    16/32 requests) it must walk to a peak outside that grid, and say whether the best is interior
    or at the lattice's bound. (The old fixed grid stopped at its corner, 512 x 32, here.)"""
    import math

    from tandem.bench.offline import HF_GRID, lattice_search

    def surface(peak: tuple[int, int]):
        runs: list[dict[str, int]] = []

        def speed(settings: dict[str, int]) -> float:
            runs.append(settings)
            if "max_batch_tokens" not in settings:
                return 1.0  # transformers' defaults: slow here
            t, r = settings["max_batch_tokens"], settings["max_requests_per_batch"]
            return 100 - abs(math.log2(t / peak[0])) - abs(math.log2(r / peak[1]))

        return speed, runs

    speed, runs = surface((256, 64))
    best, where = lattice_search(speed, HF_GRID)
    assert best == {"max_batch_tokens": 256, "max_requests_per_batch": 64} and where.startswith("interior")
    assert len(runs) == len({tuple(sorted(r.items())) for r in runs})  # nothing measured twice
    speed, _ = surface((8192, 128))
    best, where = lattice_search(speed, HF_GRID)
    assert best == {"max_batch_tokens": 8192, "max_requests_per_batch": 128} and where == "at the search's bound"


@pytest.mark.parametrize("mode", ["offline", "serve"])
def test_perf_guard_runs_base_and_tree_alternately(mode: str) -> None:
    """scripts/perf_guard.py: HEAD in a temporary worktree against this checkout, one round on
    a tiny workload, in-process or through gRPC; a ratio per system, and the worktree removed."""
    root = Path(__file__).resolve().parents[1]
    before = subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True).stdout
    bench = ["--model", "tiny-llama", "--workload", "offline-small", "--requests", "4"]
    flags = ["--serve"] if mode == "serve" else []
    bench += [] if mode == "serve" else ["--systems", "fcfs"]
    out = subprocess.run(
        [sys.executable, str(root / "scripts" / "perf_guard.py"), *flags, "--rounds", "1", "--", *bench],
        capture_output=True, text=True, timeout=600, cwd=root,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "round 1 base: tandem fcfs" in out.stdout and "round 1 tree: tandem fcfs" in out.stdout
    [row] = [line.split() for line in out.stdout.splitlines() if line.startswith("tandem fcfs")]
    assert float(row[-1]) > 0  # tree / base
    after = subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True).stdout
    assert after == before
