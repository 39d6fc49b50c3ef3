"""Thinking budgets: effort -> token tables, answer reservation, min-budget rules (pure).

Units. A *thinking token* is any token after the opening `<think>` and before `</think>`
(the forced conclusion phrase counts; the `</think>` marker itself does not). The
*output limit* is the number of output tokens that may precede the `</think>` marker so
that `answer_reserve` tokens remain for the answer within the request's `max_tokens`.

Budget forcing ends thinking with `conclusion ids + </think>`. It must start while the
remaining room `left = min(think_cap - thinking_tokens, out_limit - output_tokens)` still
fits the conclusion: it starts at the first step where `left <= len(conclusion)`, with the
full conclusion when `left == len(conclusion)` and with `</think>` alone when even the
conclusion no longer fits (tiny caps). So the thinking never exceeds `think_cap` and
`</think>` is emitted no later than output position `out_limit`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

Effort = Literal["none", "low", "medium", "high"]
EFFORT_LEVELS: tuple[str, ...] = get_args(Effort)

# Env var naming a JSON file (or holding inline JSON) of effort tables that override and
# extend the built-ins: {"<model substring>": {"low": 512, "medium": 2048, ...}, ...}.
EFFORT_TABLE_ENV = "TTC_VLLM_EFFORT_TABLE"

# Built-in tables keyed by a case-insensitive substring of the model name or path; the
# longest matching key wins, "default" otherwise. Numbers are thinking tokens. The large
# models' "high" stays below their usual 32k context; the testbed traces are ~20-200 tokens.
BUILTIN_EFFORT_TABLES: dict[str, dict[str, int]] = {
    "default": {"none": 0, "low": 1024, "medium": 4096, "high": 16384},
    "qwen3": {"none": 0, "low": 1024, "medium": 4096, "high": 16384},
    "qwq": {"none": 0, "low": 2048, "medium": 8192, "high": 24576},
    "deepseek-r1": {"none": 0, "low": 1024, "medium": 4096, "high": 16384},
    "gpt-oss": {"none": 0, "low": 512, "medium": 2048, "high": 8192},
    "testbed": {"none": 0, "low": 32, "medium": 96, "high": 256},
}


def _check_table(name: str, table: object) -> dict[str, int]:
    if not isinstance(table, dict):
        raise ValueError(f"effort table {name!r} must be an object of level -> tokens")
    out: dict[str, int] = {}
    for level, tokens in table.items():
        if level not in EFFORT_LEVELS:
            raise ValueError(
                f"effort table {name!r}: unknown level {level!r}; choose from {', '.join(EFFORT_LEVELS)}")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"effort table {name!r}.{level} must be an integer >= 0, got {tokens!r}")
        out[level] = tokens
    return out


def load_effort_tables(source: str | None = None) -> dict[str, dict[str, int]]:
    """Built-in tables overlaid with `source` (a JSON file path or inline JSON; defaults to
    the TTC_VLLM_EFFORT_TABLE env var). A partial entry inherits missing levels from
    the built-in entry of the same key, or from "default"."""
    source = source if source is not None else os.environ.get(EFFORT_TABLE_ENV)
    if not source:
        return {k: dict(v) for k, v in BUILTIN_EFFORT_TABLES.items()}
    inline = source.lstrip().startswith("{")
    st = None if inline else Path(source).stat()
    version = (st.st_mtime_ns, st.st_size, st.st_ino) if st else ()
    return {k: dict(v) for k, v in _parse_tables(source, inline, version).items()}


@lru_cache(maxsize=8)
def _parse_tables(source: str, inline: bool, version: tuple) -> dict[str, dict[str, int]]:
    """Parsed once per source (and file version): resolved for every admitted request."""
    tables = {k: dict(v) for k, v in BUILTIN_EFFORT_TABLES.items()}
    text = source if inline else Path(source).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{EFFORT_TABLE_ENV}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{EFFORT_TABLE_ENV}: expected an object of model -> table")
    # "default" first, so new entries inherit the overridden default levels.
    for name, table in sorted(data.items(), key=lambda kv: kv[0].lower() != "default"):
        base = tables.get(name.lower(), tables["default"])
        tables[name.lower()] = {**base, **_check_table(name, table)}
    return tables


def effort_table(model: str | None = None, tables: dict[str, dict[str, int]] | None = None) -> dict[str, int]:
    """The effort table for a model name/path (longest matching key, else "default")."""
    tables = tables if tables is not None else load_effort_tables()
    name = (model or "").lower()
    matches = [key for key in tables if key != "default" and key in name]
    return tables[max(matches, key=len)] if matches else tables["default"]


def effort_to_tokens(effort: str, model: str | None = None,
                     tables: dict[str, dict[str, int]] | None = None) -> int:
    if effort not in EFFORT_LEVELS:
        raise ValueError(f"reasoning_effort must be one of {', '.join(EFFORT_LEVELS)}, got {effort!r}")
    return effort_table(model, tables)[effort]


def output_limit(max_tokens: int | None, answer_reserve: int) -> int | None:
    """Output tokens allowed before `</think>`: max_tokens minus the reserve and the marker."""
    if max_tokens is None:
        return None
    return max(0, max_tokens - answer_reserve - 1)


@dataclass(frozen=True)
class ResolvedBudget:
    """What the in-engine controller enforces for one request.

    think_cap: max thinking tokens (None = no cap); out_limit: max output tokens before
    `</think>` (None = unknown max_tokens); min_think: thinking tokens before which the
    model may not end thinking (0 = none), already clipped to what the caps allow.
    """

    think_cap: int | None
    out_limit: int | None
    min_think: int

    @property
    def effective_cap(self) -> int | None:
        """The tighter of the two limits, when thinking starts at output position 0."""
        caps = [c for c in (self.think_cap, self.out_limit) if c is not None]
        return min(caps) if caps else None


def resolve_budget(*, max_think: int | None = None, min_think: int | None = None,
                   effort: str | None = None, max_tokens: int | None = None,
                   answer_reserve: int = 0, model: str | None = None,
                   tables: dict[str, dict[str, int]] | None = None) -> ResolvedBudget:
    """Turn request options into enforceable numbers.

    An explicit `max_think` wins over `effort`. `min_think` is a floor, but a budget always
    wins over it: it is clipped to the effective cap (min of think cap and output limit).
    """
    cap = max_think if max_think is not None else (
        effort_to_tokens(effort, model, tables) if effort is not None else None)
    out = output_limit(max_tokens, answer_reserve)
    rb = ResolvedBudget(cap, out, 0)
    floor = min_think or 0
    eff = rb.effective_cap
    if eff is not None:
        floor = min(floor, eff)
    return ResolvedBudget(cap, out, floor)


def room_left(think_cap: int | None, out_limit: int | None, thinking_tokens: int,
              output_tokens: int) -> int | None:
    """Tokens that may still be emitted before `</think>` (None = unlimited)."""
    rooms = []
    if think_cap is not None:
        rooms.append(think_cap - thinking_tokens)
    if out_limit is not None:
        rooms.append(out_limit - output_tokens)
    return min(rooms) if rooms else None


def forcing_start(left: int | None, conclusion_len: int) -> int | None:
    """Where budget forcing starts in `conclusion + [</think>]` given the room left, or
    None when there is still room to think freely (see the module docstring)."""
    if left is None or left > conclusion_len:
        return None
    return 0 if left == conclusion_len else conclusion_len
