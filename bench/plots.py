"""PNG plots of `tandem bench` reports (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_offline(report: dict, out_dir: str | Path) -> list[Path]:
    """Output tokens/s per system, one bar each (failed systems left out)."""
    plt = _pyplot()
    rows = [r for r in report["results"] if r["error"] is None]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    names = [r["system"] for r in rows][::-1]
    values = [r["tokens_per_s"] for r in rows][::-1]
    colors = ["tab:blue" if n.startswith("tandem") else "tab:gray" for n in names]
    ax.barh(names, values, color=colors)
    ax.set_xlim(0, max(values, default=1) * 1.12)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.0f}", va="center")
    w, env = report["workload"], report["environment"]
    ax.set_xlabel("output tokens/s")
    ax.set_title(
        f"{w['name']} ({w['requests']} requests), {env['model']} {env['dtype']} on {env['device']}", fontsize=9
    )
    fig.tight_layout()
    path = Path(out_dir) / f"offline_{w['name']}_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _cdf(ax, values_ms: list[float], label: str) -> None:
    if values_ms:
        x = np.sort(values_ms)
        ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=label)


def plot_serve(report: dict, out_dir: str | Path) -> list[Path]:
    """TTFT and ITL distributions per server and rate; throughput and latency against rate."""
    plt = _pyplot()
    out_dir, paths = Path(out_dir), []
    fig, (ax_ttft, ax_itl) = plt.subplots(1, 2, figsize=(11, 4))
    for server in report["servers"]:
        for run in server["runs"]:
            label = f"{server['label']} @ {run['rate']:g}/s"
            recs = [r for r in run["records"] if r["error"] is None]
            _cdf(ax_ttft, [r["ttft"] * 1e3 for r in recs if r["ttft"] is not None], label)
            _cdf(ax_itl, [x * 1e3 for r in recs for x in r["itl"]], label)
    for ax, name in ((ax_ttft, "time to first token (ms)"), (ax_itl, "inter-token latency (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests" if ax is ax_ttft else "fraction of gaps")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    ax_itl.legend(fontsize=7)
    fig.suptitle(f"{report['workload']} workload: latency distributions", fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / f"serve_{report['workload']}_latency_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    finite = [r for r in report["rates"] if not math.isinf(r)]
    if len(finite) >= 2:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for k, server in enumerate(report["servers"]):
            runs = [r for r in server["runs"] if not math.isinf(r["rate"])]
            x, color = [r["rate"] for r in runs], f"C{k}"
            axes[0].plot(x, [r["output_throughput"] for r in runs], "o-", color=color, label=server["label"])
            for ax, key in ((axes[1], "ttft_ms"), (axes[2], "itl_ms")):
                ax.plot(x, [r[key]["p50"] for r in runs], "o-", color=color, label=f"{server['label']} p50")
                ax.plot(x, [r[key]["p99"] for r in runs], "x--", color=color, label=f"{server['label']} p99")
        for ax, name in zip(axes, ("output tokens/s", "TTFT (ms)", "inter-token latency (ms)")):
            ax.set_xlabel("request rate (requests/s)")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / f"serve_{report['workload']}_vs_rate.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
