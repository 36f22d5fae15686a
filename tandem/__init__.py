"""tandem: LLM text generation over gRPC, with pluggable schedulers over one paged-KV executor.

The rooms: `tandem.engine` (paged KV cache, executor, sampling, model loading), `tandem.schedulers`
(the plugin API and built-in policies), `tandem.service` (gRPC servicers, server, CLI), `tandem.bench`
(benchmarks) and `tandem.v1` (the generated protocol code). See docs/architecture.md.
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("tandem")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# A checkout used without installing it (scripts/gpu_check.py on a bare GPU machine): the rooms
# are the folders beside this one, where an install's package-dir mapping would put them.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "engine" / "__init__.py").is_file():
    __path__.append(str(_checkout))
