"""Python's garbage collector and a loaded model.

NOTE: after start-up the process holds ~500k Python objects (torch, transformers, the model's
modules), and every full (generation 2) collection walks all of them: 258 ms measured on this
machine, a pause of the engine loop that lands on whichever step allocates at that moment.
They live as long as the process, so they go to the permanent generation once the engine is
built; later collections walk only what serving allocates. (vLLM and SGLang do the same.)
Frozen objects are never collected, so a closed engine thaws them: a process that builds
engine after engine (benchmarks, tests) must still free the last one's model and KV pools.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect start-up's garbage, then exempt everything alive from later collections."""
    gc.collect()
    gc.freeze()


def thaw_heap() -> None:
    """Make frozen objects collectable again (the next freeze collects what has died)."""
    gc.unfreeze()
