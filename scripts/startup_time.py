#!/usr/bin/env python3
"""Seconds from `tandem serve` to SERVING: a first start (the model converted into an empty
cache) against later starts (read from the cache), alternated in one run.

    .venv/bin/python scripts/startup_time.py [--model smollm2-135m] [--rounds 2] [-- SERVE_ARGS...]

Each round starts from a fresh cache directory holding only the compiled CPU kernel (copied
from the usual cache, so a first start pays the model's conversion and nothing else), then
starts again on that cache. Also printed: the parts of a later start measured in-process
(hashing the GGUF file, loading the converted directory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def time_to_serving(args: list[str], cache: Path) -> float:
    env = {**os.environ, "TANDEM_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "tandem"), "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.startswith("tandem serving on"):
                return time.perf_counter() - start
        raise RuntimeError(f"tandem serve exited with {proc.wait()} before serving")
    finally:
        proc.terminate()
        proc.wait(60)


def parts_of_a_later_start(model: str) -> dict[str, float]:
    from tandem.engine.model import gguf
    from tandem.engine.model.loader import load_model
    from tandem.engine.model.presets import PACKAGED

    out = {}
    if model in PACKAGED:
        start = time.perf_counter()
        gguf.file_hash(PACKAGED[model].gguf_path())
        out["hash the GGUF file"] = time.perf_counter() - start
    start = time.perf_counter()
    load_model(model, device="cpu")
    out["load_model (config, safetensors, tokenizer)"] = time.perf_counter() - start
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("serve_args", nargs="*", help="more `tandem serve` flags")
    args = p.parse_args()
    from tandem.engine.config import cache_root

    kernels = cache_root() / "kernels"
    first, later = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="tandem-startup-") as tmp:
            cache = Path(tmp)
            if kernels.is_dir():
                shutil.copytree(kernels, cache / "kernels")
            serve = ["--model", args.model, *args.serve_args]
            first.append(time_to_serving(serve, cache))
            later.append(time_to_serving(serve, cache))
    print(
        f"first start (convert): median {statistics.median(first):.1f} s  (runs {', '.join(f'{x:.1f}' for x in first)})"
    )
    print(
        f"later start:           median {statistics.median(later):.1f} s  (runs {', '.join(f'{x:.1f}' for x in later)})"
    )
    for name, seconds in parts_of_a_later_start(args.model).items():
        print(f"  {name}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
