"""Python's garbage collector and a loaded model.

NOTE: after start-up the process holds ~500k Python objects (torch, transformers, the model's
modules), and every full (generation 2) collection walks all of them: 258 ms measured on this
machine, a pause of the engine loop that lands on whichever step allocates at that moment.
They live as long as the engine, so they go to the permanent generation once it is built;
later collections walk only what serving allocates. (vLLM and SGLang do the same.)

Frozen objects are never collected, and freezing is process-wide: closing any engine thaws
everything, so a closed engine's model and KV pools can be freed (other engines alive in the
process lose the exemption until the next one is built: slower collections, never a leak),
and each engine collects before it is built, so what a closed one left in reference cycles,
device memory included, is freed before the new one measures the memory it may take.
"""

from __future__ import annotations

import gc


def collect_before_build() -> None:
    gc.collect()


def freeze_startup_heap() -> None:
    """An engine is built: exempt everything alive from later collections."""
    gc.freeze()


def thaw_heap() -> None:
    """An engine closed: frozen objects are collectable again."""
    gc.unfreeze()
