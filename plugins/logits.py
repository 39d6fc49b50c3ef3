"""`TTCLogitsProcessor`: the one entry-point class for both vLLM model runners.

Registered under the `vllm.logits_processors` entry point as
`ttc_vllm_plugins.logits:TTCLogitsProcessor`. The V1 loader requires a subclass of
`vllm.v1.sample.logits_processor.LogitsProcessor` and the V2 loader a subclass of
`vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`, so this class derives from
every one of them this vLLM has (ttc_vllm_plugins/vllm_compat.py: a missing one turns off
only that runner's controls, with a warning) and picks its implementation from the
constructor signature: V1 `(vllm_config, device, is_pin_memory)`, V2 `(vllm_config, req_states)`.
vLLM loads this module at every engine start: nothing here may fail for a request or a
moved internal -- an exception in a step turns the controls off for this engine, logged,
and passes the logits through.

If the class is loaded twice for one engine (entry point + `logits_processors=[...]`),
only the first instance acts; the second passes logits through, so the controls are
never applied twice.
"""
from __future__ import annotations

import logging
import threading
import weakref

import torch

from ttc_vllm_plugins import logits_common as common
from ttc_vllm_plugins import vllm_compat

logger = logging.getLogger("ttc_vllm.plugins")
vllm_compat.check_version()

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


class TTCLogitsProcessor(*vllm_compat.logits_processor_bases()):
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

    def _turn_off(self, error: Exception) -> None:
        """A step raised (a moved vLLM internal, or a bug): no controls for this engine
        from now on, rather than no engine."""
        logger.error("ttc-vllm: the thinking controls are off for this engine: %s raised",
                     self.runner, exc_info=error)
        vllm_compat.feature_off(f"the thinking controls on the {self.runner.upper()} model runner",
                                f"{type(error).__name__}: {error}")
        self._v1 = self._v2 = None

    # V1 interface
    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        if self._v1 is not None:
            try:
                self._v1.update_state(batch_update)
            except Exception as e:  # noqa: BLE001 -- see _turn_off
                self._turn_off(e)

    # V2 interface
    def add_request(self, req_idx: int, sampling_params) -> bool:
        if self._v2 is None:
            return False
        try:
            return self._v2.add_request(req_idx, sampling_params)
        except Exception as e:  # noqa: BLE001
            self._turn_off(e)
            return False

    def apply_staged_writes(self) -> None:
        if self._v2 is not None:
            try:
                self._v2.apply_staged_writes()
            except Exception as e:  # noqa: BLE001
                self._turn_off(e)

    # both: V1 calls apply(logits), V2 apply(logits, ctx)
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        impl = self._v1 if ctx is None else self._v2
        if impl is None:
            return logits
        try:
            return impl.apply(logits) if ctx is None else impl.apply(logits, ctx)
        except Exception as e:  # noqa: BLE001
            self._turn_off(e)
            return logits
