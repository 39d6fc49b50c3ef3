"""The bounds every numeric request option obeys (pure; shared by both option models).

Token counts are capped at `MAX_TOKENS` (2**24 = 16,777,216), far above any context a
model is served with today and far below what the controller's int64 state can hold, so no
option value can overflow inside the engine. The server tightens budgets further to the
served model's context (`max_model_len`). Every integer and real option is strict: JSON
`true`, `"40"` or `4.0` for an integer is an error, not 1 / 40 / 4.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated

from pydantic import Field, Strict

MAX_TOKENS = 1 << 24
MAX_EXTENSIONS = 1024   # "Wait" continuations a request may ask for
MAX_COUNT = 4096        # waves, votes, children, rollouts, steps: bounded by n in practice

TokenCount = Annotated[int, Strict(), Field(ge=0, le=MAX_TOKENS)]
StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict()]


def env_positive_int(name: str, default: int, env: Mapping[str, str] = os.environ) -> int:
    """A positive integer setting from the environment (unset or blank: `default`)."""
    raw = env.get(name, "")
    if not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value
