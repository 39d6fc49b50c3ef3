"""What both logits-processor interfaces share: validation, the engine's marker ids and
tokenizer, turning a request's options into controller `SlotParams`, finished records.

The maths lives in ttc_vllm.control (torch only); this module is the vLLM-facing glue.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from ttc_vllm.control import Markers, SlotParams, SlotRecord
from ttc_vllm.halting import SIGNALS
from ttc_vllm.options import TTCOptions
from ttc_vllm_plugins import vllm_compat
from ttc_vllm_plugins.live_controls import LIVE, RID_KEY, LiveSlot

logger = logging.getLogger("ttc_vllm.plugins")

# Token strings overriding the thinking markers (else the server's --reasoning-config
# single-token ids, else the tokenizer's "<think>" / "</think>").
THINK_START_ENV = "TTC_VLLM_THINK_START"
THINK_END_ENV = "TTC_VLLM_THINK_END"
DEFAULT_THINK_START = "<think>"
DEFAULT_THINK_END = "</think>"
ENCODE_CACHE_SIZE = 1024


def parse_options(sampling_params) -> TTCOptions | None:
    """The request's TTC options (None without extra_args["ttc"]); ValueError naming the
    field when invalid, including an unknown calibration entry name."""
    opts = TTCOptions.from_extra_args(getattr(sampling_params, "extra_args", None))
    if opts is not None:
        opts.resolved_halting()
    return opts


def validate_params(sampling_params) -> None:
    """Admission check (API process): a ValueError here is an HTTP 400."""
    parse_options(sampling_params)


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


@dataclass
class EngineContext:
    """Per-engine constants the processors need: tokenizer, markers, model name."""

    tokenizer: Any
    markers: Markers | None
    model: str
    default_eos: int | None
    # Conclusion / continuation strings repeat across requests: encode each once.
    _encoded: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> EngineContext:
        model = vllm_compat.served_model_names(vllm_config)
        tokenizer = vllm_compat.tokenizer_for(vllm_config)
        markers = cls._markers(vllm_config, tokenizer)
        if markers is None:
            logger.warning("ttc-vllm: no single-token thinking markers for %s; thinking controls "
                           "are disabled (set %s/%s)", model, THINK_START_ENV, THINK_END_ENV)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        LIVE.markers = markers   # the scheduler counts thinking tokens with them
        return cls(tokenizer, markers, model, eos)

    @staticmethod
    def _markers(vllm_config, tokenizer) -> Markers | None:
        start_s, end_s = os.environ.get(THINK_START_ENV), os.environ.get(THINK_END_ENV)
        if tokenizer is not None and (start_s or end_s):
            start = _single_token(tokenizer, start_s or DEFAULT_THINK_START)
            end = _single_token(tokenizer, end_s or DEFAULT_THINK_END)
            return Markers(start, end) if start is not None and end is not None else None
        start_ids, end_ids = vllm_compat.reasoning_marker_ids(vllm_config)
        if start_ids and end_ids and len(start_ids) == 1 and len(end_ids) == 1:
            return Markers(start_ids[0], end_ids[0])
        if tokenizer is None:
            return None
        start = _single_token(tokenizer, DEFAULT_THINK_START)
        end = _single_token(tokenizer, DEFAULT_THINK_END)
        return Markers(start, end) if start is not None and end is not None else None

    def encode(self, text: str) -> tuple[int, ...]:
        if self.tokenizer is None:
            return ()
        ids = self._encoded.get(text)
        if ids is None:
            if len(self._encoded) >= ENCODE_CACHE_SIZE:
                self._encoded.clear()   # options are per request: bound the cache
            ids = self._encoded[text] = tuple(self.tokenizer.encode(text, add_special_tokens=False))
        return ids

    def slot_params(self, options: TTCOptions, sampling_params, **initial) -> SlotParams:
        eos = getattr(sampling_params, "eos_token_id", None)
        eos = eos if eos is not None else self.default_eos
        stop_ids = set(getattr(sampling_params, "all_stop_token_ids", ()) or ())
        return SlotParams.from_options(
            options, encode=self.encode, max_tokens=getattr(sampling_params, "max_tokens", None),
            stop_ids=sorted(stop_ids), eos_id=eos, model=self.model, **initial)


def options_or_none(sampling_params) -> TTCOptions | None:
    """Parse in the worker; a request that slipped past admission is left uncontrolled."""
    try:
        return parse_options(sampling_params)
    except ValueError as e:  # validate_params normally rejected it already
        logger.error("ttc-vllm: ignoring invalid options in the worker: %s", e)
        return None


def admit(ctrl, slot: int, ctx: EngineContext, options: TTCOptions, sampling_params,
          **initial) -> bool:
    """Resolve and add one request to the controller; False (logged, uncontrolled) if that
    raises: an exception in the engine worker would take every request down with it."""
    try:
        params = ctx.slot_params(options, sampling_params, **initial)
        ctrl.add(slot, params)
    except Exception as e:  # noqa: BLE001 -- anything, rather than the engine
        logger.error("ttc-vllm: leaving a request uncontrolled, its options could not be "
                     "admitted: %s: %s", type(e).__name__, e)
        return False
    extra = getattr(sampling_params, "extra_args", None) or {}
    LIVE.put(extra.get(RID_KEY), LiveSlot(
        ctrl, slot, len(params.conclusion_ids) + 1 + len(params.answer_prefix_ids),
        len(params.continuation_ids),
        SIGNALS[params.halting.signal] if params.halting is not None else None))
    return True


def retire(ctrl, slot: int) -> None:
    """A request left its slot: keep its outcome, and stop serving it to the scheduler."""
    LIVE.drop(ctrl, slot)
    FINISHED.add(ctrl.remove(slot))


class FinishedRecords:
    """Outcomes of finished requests for metrics (the stat logger reads and clears them)."""

    def __init__(self, maxlen: int = 4096):
        self._lock = threading.Lock()
        self._records: deque[SlotRecord] = deque(maxlen=maxlen)
        self.reasons: Counter[str] = Counter()

    def add(self, record: SlotRecord | None) -> None:
        if record is None:
            return
        with self._lock:
            self._records.append(record)
            self.reasons[record.reason] += 1

    def drain(self) -> list[SlotRecord]:
        with self._lock:
            out = list(self._records)
            self._records.clear()
            return out


FINISHED = FinishedRecords()
