"""Who gets the CPU while a command runs: cores used per thread, per phase, and the machine's total.

    python scripts/cpu_share.py -- .venv/bin/tandem bench serve --model bench-llama \\
        --schedulers fcfs --workload offline --concurrency 64 --offline-baseline

Samples /proc every half second (each thread's user+system time, and /proc/stat) for the
command's process tree, then reports each busy phase: a stretch where the tree used more than
one core, labelled by the process that used most of it (the served engine lives in a `tandem
serve` child; the offline baseline's engine in the bench process itself). For each phase: the
cores each busy thread used, the rest of the tree, and the machine's busy cores (what no thread
here accounts for: the kernel's loopback TCP, other tenants). On a 2-core machine an engine
whose OpenMP team wants both cores gets what everything else leaves it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    t: float
    busy: float  # machine-wide busy CPU seconds since boot
    threads: dict[tuple[int, int], tuple[str, float]] = field(default_factory=dict)  # (pid, tid) -> (name, cpu s)
    commands: dict[int, str] = field(default_factory=dict)


def tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry))
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def sample(root: int) -> Sample:
    cpu = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    s = Sample(time.time(), (sum(cpu) - cpu[3] - cpu[4]) / TICK)  # all but idle and iowait
    for pid in tree(root):
        try:
            s.commands[pid] = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:100]
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = open(f"/proc/{pid}/task/{tid}/stat").read()
                f = stat[stat.rindex(")") + 2 :].split()
                s.threads[(pid, int(tid))] = (
                    stat[stat.index("(") + 1 : stat.rindex(")")],
                    (int(f[11]) + int(f[12])) / TICK,
                )
        except OSError:
            continue
    return s


def phases(samples: list[Sample], threshold: float = 1.0) -> list[tuple[int, int]]:
    """Runs of consecutive intervals where the tree used more than `threshold` cores."""
    runs, start = [], None
    for i in range(1, len(samples)):
        a, b = samples[i - 1], samples[i]
        used = sum(c - a.threads.get(k, (n, c))[1] for k, (n, c) in b.threads.items()) / (b.t - a.t)
        if used > threshold and start is None:
            start = i - 1
        elif used <= threshold and start is not None:
            runs.append((start, i - 1))
            start = None
    if start is not None:
        runs.append((start, len(samples) - 1))
    return [(a, b) for a, b in runs if samples[b].t - samples[a].t >= 5]  # start-up blips are not phases


def report(samples: list[Sample], threshold: float = 1.0) -> list[dict]:
    out = []
    for a, b in phases(samples, threshold):
        # trim a second at each end: engines ramping up and down are not the steady state
        a, b = min(a + 2, b), max(b - 2, a)
        s0, s1 = samples[a], samples[b]
        dt = s1.t - s0.t
        per = {k: (n, (c - s0.threads.get(k, (n, 0.0))[1]) / dt) for k, (n, c) in s1.threads.items()}
        by_pid: dict[int, float] = {}
        for (pid, _), (_, cores) in per.items():
            by_pid[pid] = by_pid.get(pid, 0.0) + cores
        main = max(by_pid, key=lambda p: by_pid[p])
        busy = sorted(((cores, n, k) for k, (n, cores) in per.items() if cores >= 0.005), reverse=True)
        out.append(
            dict(
                seconds=dt,
                process=s1.commands.get(main, "?"),
                threads=[dict(pid=k[0], tid=k[1], name=n, cores=round(c, 3)) for c, n, k in busy],
                tree_cores=round(sum(by_pid.values()), 3),
                machine_cores=round((s1.busy - s0.busy) / dt, 3),
            )
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--threshold", type=float, default=1.0, help="cores the tree must use to make a phase")
    p.add_argument("--json", help="write the phases here")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    child = subprocess.Popen(command)
    samples = []
    while child.poll() is None:
        samples.append(sample(child.pid))
        time.sleep(args.every)
    result = report(samples, args.threshold)
    for i, ph in enumerate(result):
        print(f"phase {i}: {ph['seconds']:.0f} s, mostly {ph['process']}")
        print(f"  this tree {ph['tree_cores']:.2f} cores, the machine {ph['machine_cores']:.2f} busy")
        for t in ph["threads"]:
            print(f"    {t['cores']:.3f}  pid {t['pid']} {t['name']} [{t['tid']}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
