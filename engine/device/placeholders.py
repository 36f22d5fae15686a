"""Placeholder tokens: a token id of -(r + 1) stands for "the token sampled in row r of the
previous step", not yet read back to the host. The async-overlap mode plans step N+1 before
step N's tokens are known; the device resolves them from step N's output tensor, both in the
step's input ids and in the penalty histories of its sampling."""

from __future__ import annotations

import torch


def placeholder(row: int) -> int:
    return -(row + 1)


def resolve_placeholders(ids: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
    """Replace each placeholder -(r + 1) by prev_tokens[r], on the device."""
    return torch.where(ids < 0, prev_tokens[(-ids - 1).clamp(min=0)], ids)
