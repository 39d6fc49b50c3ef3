"""`TTCLogitsProcessor`: the one entry-point class for both vLLM model runners.

Registered under the `vllm.logits_processors` entry point as
`ttc_vllm_plugins.logits:TTCLogitsProcessor`. The V1 loader requires a subclass of
`vllm.v1.sample.logits_processor.LogitsProcessor` and the V2 loader a subclass of
`vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`, so this class derives from
both and picks its implementation from the constructor signature:
V1 `(vllm_config, device, is_pin_memory)`, V2 `(vllm_config, req_states)`.

If the class is loaded twice for one engine (entry point + `logits_processors=[...]`),
only the first instance acts; the second passes logits through, so the controls are
never applied twice.
"""
from __future__ import annotations

import threading
import weakref

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from ttc_vllm_plugins import logits_common as common

_owners: dict[int, weakref.ref] = {}
_owners_lock = threading.Lock()


def _claim(vllm_config, instance) -> bool:
    """True for the first live instance built for this engine config."""
    key = id(vllm_config)
    with _owners_lock:
        ref = _owners.get(key)
        if ref is not None and ref() is not None:
            return False
        _owners[key] = weakref.ref(instance)
        return True


class TTCLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """Thinking budgets, budget forcing, effort levels and log-prob halting per request
    (options in `SamplingParams.extra_args["ttc"]`, see ttc_vllm.options)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        common.validate_params(sampling_params)

    def __init__(self, vllm_config, *args, **kwargs):
        self._v1 = self._v2 = None
        is_v2 = (len(args) == 1 and not kwargs) or "req_states" in kwargs
        self.runner = "v2" if is_v2 else "v1"
        self._config = vllm_config  # keeps id(vllm_config) unique while this owner lives
        if not _claim(vllm_config, self):
            return
        if is_v2:
            from ttc_vllm_plugins.logits_v2 import TTCLogitsProcessorV2

            self._v2 = TTCLogitsProcessorV2(vllm_config, *args, **kwargs)
        else:
            from ttc_vllm_plugins.logits_v1 import TTCLogitsProcessorV1

            self._v1 = TTCLogitsProcessorV1(vllm_config, *args, **kwargs)

    @property
    def active(self) -> bool:
        return self._v1 is not None or self._v2 is not None

    @property
    def controller(self):
        impl = self._v1 or self._v2
        return impl.ctrl if impl is not None else None

    # V1 interface
    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        if self._v1 is not None:
            self._v1.update_state(batch_update)

    # V2 interface
    def add_request(self, req_idx: int, sampling_params) -> bool:
        return self._v2.add_request(req_idx, sampling_params) if self._v2 is not None else False

    def apply_staged_writes(self) -> None:
        if self._v2 is not None:
            self._v2.apply_staged_writes()

    # both: V1 calls apply(logits), V2 apply(logits, ctx)
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is None:
            return self._v1.apply(logits) if self._v1 is not None else logits
        return self._v2.apply(logits, ctx) if self._v2 is not None else logits


def finished_records():
    """Drain the outcomes of requests finished in this process (for metrics)."""
    return common.FINISHED.drain()
