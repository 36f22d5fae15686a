"""The installed shape: one import package, `tandem`, over the repository's rooms; serving
imports no benchmark code; the command line reports its version and defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ (the package itself supports 3.10)")

ROOT = Path(__file__).resolve().parents[1]
ROOMS = {"tandem": "tandem", "tandem.engine": "engine", "tandem.schedulers": "schedulers",
         "tandem.service": "service", "tandem.bench": "bench"}  # fmt: skip


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_every_package_folder_is_installed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == ROOMS
    found = set()
    for package, folder in ROOMS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *rel)))
    assert sorted(config["packages"]) == sorted(found)


@pytest.mark.parametrize("name", ["engine", "service", "schedulers", "bench"])
def test_only_tandem_is_importable_outside_the_repo(name: str, tmp_path: Path) -> None:
    bare = python(f"import {name}", tmp_path)
    assert bare.returncode != 0 and "ModuleNotFoundError" in bare.stderr
    ok = python(f"import tandem.{name}; print(tandem.{name}.__file__)", tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert Path(ok.stdout.strip()).parent == ROOT / name  # the editable install maps it onto the room


def test_serving_imports_no_benchmark_code(tmp_path: Path) -> None:
    code = """
import sys
from tandem.service.cli import build_parser
from tandem.service.flags import from_flags
from tandem.service.engine_slot import EngineSlot
from tandem.service.server import ServerOptions, build_server
from tandem.engine import Engine, EngineConfig
from tandem.schedulers import load_scheduler

args = build_parser().parse_args(["serve", "--port", "0", "--model", "tiny-llama"])
engine = Engine(from_flags(EngineConfig, args), load_scheduler("fcfs"))
server = build_server(EngineSlot(engine), from_flags(ServerOptions, args))
assert server.port > 0
engine.shutdown()
print(sorted(m for m in sys.modules if m.startswith(("matplotlib", "tandem.bench"))))
"""
    res = python(code, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_version_and_defaults_in_help() -> None:
    tandem = str(Path(sys.executable).parent / "tandem")
    version = subprocess.run([tandem, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("tandem 0.")
    serve = subprocess.run([tandem, "serve", "--help"], capture_output=True, text=True, timeout=120)
    text = " ".join(serve.stdout.split())
    for default in ("(default: 127.0.0.1)", "(default: 50051)", "(default: 1024)", "(default: smollm2-135m)",
                    "(default: 2048)", "(default: 300.0)"):  # fmt: skip
        assert default in text, default


# Inside the engine, a room may import only the rooms after it here (and itself).
ENGINE_ROOMS = ["host", "model", "device"]


def test_engine_rooms_import_downward() -> None:
    import ast

    bad = []
    for i, room in enumerate(ENGINE_ROOMS):
        below = set(ENGINE_ROOMS[i:])
        for path in (ROOT / "engine" / room).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tandem.engine."):
                    target = node.module.split(".")[2]  # type: ignore[union-attr]
                    if target in ENGINE_ROOMS and target not in below:
                        bad.append(f"{path.relative_to(ROOT)} imports {node.module}")
                    if target == "engine":  # the facade sits above every room
                        bad.append(f"{path.relative_to(ROOT)} imports {node.module}")
    assert not bad, bad
