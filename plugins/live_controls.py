"""Which controller slot serves which engine request, for the engine core's scheduler.

The scheduler (ttc_vllm_plugins/kv_accounting.py) stamps each engine request that carries
`ttc` options with its request id (`extra_args["ttc_rid"]`) before the model runner sees
it; the logits processor registers the slot it admits that request to under that id; when
the scheduler frees the request it reads the slot's outcome here -- one host read per
finished request -- and sends it back with the request's last output.

This works where the scheduler and the logits processor share a process: vLLM's
single-worker executor (the default for one GPU, and the CPU backend). With several
workers (tensor parallelism) the record carries KV and thinking-token counts but no
`ended` reason, and says so (`"ended": "unknown"`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

RID_KEY = "ttc_rid"


@dataclass(frozen=True)
class LiveSlot:
    controller: Any          # ttc_vllm.control.ThinkingController
    slot: int
    conclusion_tokens: int   # forced by a budget or halt: conclusion + </think> + answer prefix
    continuation_tokens: int
    signal: str | None       # halting signal, if any


class LiveControls:
    def __init__(self):
        self._lock = threading.Lock()
        self._by_rid: dict[str, LiveSlot] = {}
        self._rid_of: dict[tuple[int, int], str] = {}
        self.markers = None      # the engine's thinking markers, once a processor knows them

    def put(self, rid: str | None, live: LiveSlot) -> None:
        if not rid:
            return
        with self._lock:
            self._by_rid[rid] = live
            self._rid_of[(id(live.controller), live.slot)] = rid

    def drop(self, controller, slot: int) -> None:
        with self._lock:
            rid = self._rid_of.pop((id(controller), slot), None)
            if rid is not None:
                self._by_rid.pop(rid, None)

    def outcome(self, rid: str) -> dict[str, Any] | None:
        """The controller's view of a live request: how thinking ended so far, forced
        tokens, extensions, halting signal. None if no slot serves it."""
        with self._lock:
            live = self._by_rid.get(rid)
        if live is None:
            return None
        from ttc_vllm.control_state import REASON_BUDGET, REASON_HALT, REASON_NAMES, REASON_STOP

        record = live.controller.record(live.slot)
        reason = REASON_NAMES.index(record.reason)
        forced = {"conclusion": live.conclusion_tokens if reason in (REASON_BUDGET, REASON_HALT) else 0,
                  "continuation": record.extensions * live.continuation_tokens,
                  "eos": 1 if reason == REASON_STOP else 0}
        return {"ended": record.reason, "stop_step": record.stop_step,
                "extensions": record.extensions, "forced": forced, "signal": live.signal}


LIVE = LiveControls()
