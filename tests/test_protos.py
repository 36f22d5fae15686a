"""The API definition: buf lint passes and the committed generated code is current."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_buf_lint() -> None:
    res = subprocess.run([str(BIN / "buf"), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_generated_code_is_current(tmp_path) -> None:
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    protos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "protos").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iprotos",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            *protos,
        ],
        cwd=tmp_path,
        check=True,
    )
    fresh = sorted(p.name for p in (tmp_path / "tandem" / "v1").glob("*.py*"))
    committed = sorted(p.name for p in (ROOT / "tandem" / "v1").glob("*.py*") if p.name != "__init__.py")
    assert fresh == committed
    for name in fresh:
        assert filecmp.cmp(tmp_path / "tandem" / "v1" / name, ROOT / "tandem" / "v1" / name, shallow=False), (
            f"tandem/v1/{name} is stale: run scripts/gen_protos"
        )


def test_buf_breaking_against_the_previous_commit() -> None:
    """FILE-level breaking changes against the last commit that had protos (none: nothing to compare)."""
    git = subprocess.run(
        ["git", "log", "-n", "1", "--skip", "1", "--format=%H", "--", ":(glob)protos/**/*.proto"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    previous = git.stdout.strip()
    if git.returncode != 0 or not previous:
        pytest.skip("a shallow clone, or the protos' first commit: no earlier API to compare against")
    res = subprocess.run(
        [str(BIN / "buf"), "breaking", "--against", f".git#ref={previous}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
