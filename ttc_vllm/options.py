"""Per-request test-time-compute options: the single source of validation.

HTTP, jobs, the CLI and the logits processors all parse `TTCOptions`; nothing else
re-validates. Requests carry them in `SamplingParams.extra_args["ttc"]`, as a dict
(offline) or a JSON string: over HTTP vLLM's `vllm_xargs` accepts only flat str/int/float
values, so clients send `vllm_xargs={"ttc": json.dumps({...})}` (see `to_extra_args`).
"""
from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from typing import Any, Literal

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from ttc_vllm import budget
from ttc_vllm.halting import Aggregate, Signal, check_threshold_range
from ttc_vllm.limits import MAX_EXTENSIONS, StrictInt, TokenCount
from ttc_vllm.search.options import MAX_N_ENV, SAMPLING_STRATEGIES, SearchOptions

EXTRA_ARGS_KEY = "ttc"
DEFAULT_CONCLUSION = "\nTime is up, concluding."
DEFAULT_CONTINUATION = "\nWait,"
MAX_FORCED_TEXT_CHARS = 256

class HaltingOptions(BaseModel):
    """Log-prob halting: stop thinking when an aggregate of a per-token confidence signal
    crosses a threshold (TS-DTP rule: halt iff f(v_t) > tau; `direction="below"` gives the
    DeepConf online rule, halt iff f(v_t) < tau). See ttc_vllm/halting.py for the maths."""

    model_config = ConfigDict(extra="forbid")

    signal: Signal = "token_confidence"
    top_k: StrictInt = Field(20, ge=1, le=20, description="top-k log-probs in token confidence")
    window: StrictInt = Field(64, ge=1, le=8192, description="tokens per group / tail window")
    aggregate: Aggregate = "tail"
    # A real number, or the name of an entry of the calibration file (ttc_vllm/calibrate.py).
    threshold: float | str
    direction: Literal["above", "below"] = "above"
    action: Literal["conclude", "stop"] = "conclude"
    min_tokens: TokenCount = Field(0, description="thinking tokens before halting may trigger")

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_kind(cls, v: Any, info: ValidationInfo) -> Any:
        v = cls._threshold_value(v)
        if "signal" in info.data:  # declared before threshold, so already validated
            check_threshold_range(info.data["signal"], v)
        return v

    @staticmethod
    def _threshold_value(v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be a number or a calibration entry name, not a boolean")
        if isinstance(v, str):
            name = v.strip()
            if not name:
                raise ValueError("calibration entry name must not be empty")
            try:
                v = float(name)  # a number sent as a string is still a number
            except ValueError:
                if len(name) > 128:
                    raise ValueError("calibration entry name is longer than 128 characters") from None
                return name
        if isinstance(v, (int, float)):
            if not math.isfinite(float(v)):
                raise ValueError(f"must be a finite number, got {v!r}")
            return float(v)
        raise ValueError(f"must be a number or a calibration entry name, got {type(v).__name__}")

    @property
    def is_calibrated(self) -> bool:
        """True when the threshold names a calibration entry still to be looked up."""
        return isinstance(self.threshold, str)


class TTCOptions(BaseModel):
    """Everything a request may ask of the in-engine test-time-compute controls."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    max_think: TokenCount | None = Field(None, description="hard cap on thinking tokens")
    # Anthropic `budget_tokens` / Gemini `thinking_budget`: another name for max_think.
    budget_tokens: TokenCount | None = Field(
        None, validation_alias=AliasChoices("budget_tokens", "thinking_budget"))
    min_think: TokenCount | None = Field(None, description="s1-style minimum thinking tokens")
    reasoning_effort: budget.Effort | None = None
    answer_reserve: TokenCount = Field(16, description="tokens kept for the answer within max_tokens")
    conclusion: str | None = Field(DEFAULT_CONCLUSION, max_length=MAX_FORCED_TEXT_CHARS)
    # s1's "Final Answer:": forced right after the `</think>` of a forced conclusion (budget
    # or halting), so a cut trace answers; None leaves the answer to the model.
    answer_prefix: str | None = Field(None, min_length=1, max_length=MAX_FORCED_TEXT_CHARS)
    continuation: str = Field(DEFAULT_CONTINUATION, max_length=MAX_FORCED_TEXT_CHARS)
    max_extensions: StrictInt = Field(8, ge=0, le=MAX_EXTENSIONS, description="continuations injected at most")
    halting: HaltingOptions | None = None
    # Search strategies run outside the engine (server or jobs); their options model lives
    # with the strategies, validated here as part of the one request model.
    search: SearchOptions | None = None

    @model_validator(mode="after")
    def _consistent_budgets(self) -> TTCOptions:
        if self.budget_tokens is not None:
            if self.max_think is not None and self.max_think != self.budget_tokens:
                raise ValueError(
                    f"max_think ({self.max_think}) and budget_tokens ({self.budget_tokens}) "
                    "both set and differ; send one")
            self.max_think = self.budget_tokens
        if (self.min_think is not None and self.max_think is not None
                and self.min_think > self.max_think):
            raise ValueError(
                f"min_think ({self.min_think}) must not exceed max_think ({self.max_think})")
        # With a search the controls apply to each of its engine requests: one whole trace
        # for the sampling strategies, one step for beam / DVTS / MCTS, where a halting
        # window would restart every step.
        if (self.halting is not None and self.search is not None
                and self.search.strategy not in SAMPLING_STRATEGIES):
            raise ValueError(
                f"halting: applies to each sampled trace of {', '.join(SAMPLING_STRATEGIES)}; "
                f"search.strategy {self.search.strategy!r} sends one step per engine request")
        return self

    def sample_controls(self) -> str | None:
        """The thinking controls alone (no search), as the `extra_args["ttc"]` JSON that
        every engine request of a search carries; None when the request sets none."""
        payload = self.model_copy(update={"search": None}).to_extra_args()[EXTRA_ARGS_KEY]
        return None if payload == "{}" else payload

    # ---- extra_args encoding -------------------------------------------------------------

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> TTCOptions | None:
        """The options in `extra_args["ttc"]` (dict or JSON string), None if absent.

        Raises ValueError naming the offending field as `ttc.<field>`."""
        raw = extra_args.get(EXTRA_ARGS_KEY) if extra_args else None
        if raw is None:
            return None
        text = raw if isinstance(raw, str) else None
        if text is not None:
            known = PARSED.get(text)
            if known is not None:
                return known
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{EXTRA_ARGS_KEY}: not valid JSON ({e.msg} at {e.pos})") from None
        if not isinstance(raw, dict):
            raise ValueError(
                f"{EXTRA_ARGS_KEY}: expected an object (or its JSON string), got {type(raw).__name__}")
        try:
            options = cls.model_validate(raw)
        except ValidationError as e:
            raise ValueError(_describe(e)) from None
        if text is not None:
            PARSED.put(text, options)
        return options

    def to_extra_args(self) -> dict[str, str]:
        """`{"ttc": "<json>"}`: valid both as `SamplingParams.extra_args` and as HTTP
        `vllm_xargs` (flat string values only). The text is remembered with these (validated)
        options, so reading it back in this process does not validate again."""
        payload = self.model_dump(mode="json", exclude_defaults=True)
        if payload.get("budget_tokens") is not None:  # normalised into max_think
            payload.pop("budget_tokens")
        text = json.dumps(payload, separators=(",", ":"))
        PARSED.put(text, self)
        return {EXTRA_ARGS_KEY: text}

    # ---- resolution ----------------------------------------------------------------------

    def resolve_budget(self, max_tokens: int | None, model: str | None = None,
                       tables: dict[str, dict[str, int]] | None = None) -> budget.ResolvedBudget:
        return budget.resolve_budget(
            max_think=self.max_think, min_think=self.min_think, effort=self.reasoning_effort,
            max_tokens=max_tokens, answer_reserve=self.answer_reserve, model=model, tables=tables)

    def resolved_think(self, max_tokens: int | None, model: str | None = None,
                       tables: dict[str, dict[str, int]] | None = None) -> tuple[int | None, int]:
        """(max thinking tokens, min thinking tokens) for a request with `max_tokens`:
        effort mapped through the model's table, the answer reserve taken off, the
        minimum clipped to the cap. None = uncapped."""
        rb = self.resolve_budget(max_tokens, model, tables)
        return rb.effective_cap, rb.min_think

    def resolved_halting(self, calibration: dict[str, dict[str, Any]] | None = None) -> HaltingOptions | None:
        """Halting options with a numeric threshold (a named threshold is looked up in the
        calibration file; the entry's signal settings apply, conflicting explicit ones fail)."""
        h = self.halting
        if h is None or not h.is_calibrated:
            return h
        from ttc_vllm.calibrate import load_calibration

        table = calibration if calibration is not None else load_calibration()
        name = str(h.threshold)
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise ValueError(f"halting.threshold: no calibration entry {name!r} (known: {known})")
        entry = dict(table[name])
        merged = h.model_dump()
        for key, value in entry.items():
            if key not in HaltingOptions.model_fields:
                continue  # provenance fields (percentile, traces, ...) are not options
            if key in h.model_fields_set and key != "threshold" and merged[key] != value:
                raise ValueError(
                    f"halting.{key}: {merged[key]!r} conflicts with calibration entry "
                    f"{name!r} ({key}={value!r})")
            merged[key] = value
        try:
            return HaltingOptions.model_validate(merged)
        except ValidationError as e:
            raise ValueError(f"calibration entry {name!r}: " + _describe(e, prefix="halting")) from None


class ParsedOptions:
    """Validated options by their exact `extra_args["ttc"]` text, per process (LRU): every
    engine request of a search carries the same text, and the API server reads back the
    text its middleware wrote, so each distinct text is parsed and validated once. The
    options returned are shared: callers treat them as read-only (`model_copy` to change)."""

    def __init__(self, size: int = 1024):
        self.size = size
        self._items: OrderedDict[tuple[str, str | None], TTCOptions] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(text: str) -> tuple[str, str | None]:
        # the ceiling on search.n is read at validation time: a new one validates anew
        return text, os.environ.get(MAX_N_ENV)

    def get(self, text: str) -> TTCOptions | None:
        key = self._key(text)
        with self._lock:
            options = self._items.get(key)
            if options is not None:
                self._items.move_to_end(key)
            return options

    def put(self, text: str, options: TTCOptions) -> None:
        key = self._key(text)
        with self._lock:
            self._items[key] = options
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


PARSED = ParsedOptions()


def _describe(err: ValidationError, prefix: str = EXTRA_ARGS_KEY) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid test-time-compute options: " + "; ".join(parts)
