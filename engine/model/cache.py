"""Directories built once into the model cache (presets, converted GGUF files), safe against
concurrent builders: a build runs in a temporary sibling under a lock and is renamed into place,
so a reader sees a whole directory or none."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tandem.engine.config import cache_root

# A directory counts as built once this file is in it (every model directory has one).
MARKER = "config.json"


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def built_once(kind: str, name: str, build: Callable[[Path], None]) -> Path:
    """`cache_root()/kind/name`, made by `build(tmp_dir)` on first use."""
    target = cache_root() / kind / name
    if (target / MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / MARKER).exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
            try:
                build(tmp)
                # mkdtemp makes it 0700: a cache shared between users (TANDEM_CACHE_DIR) needs the
                # permissions any directory of theirs would get.
                mask = _umask()
                tmp.chmod(0o777 & ~mask)
                for f in tmp.rglob("*"):  # some writers (safetensors) make their files 0600
                    if f.is_file():
                        f.chmod(0o666 & ~mask)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target
