"""TTC controls as a logits processor of vLLM's Model Runner V2 (default on GPU).

V2 keys requests by a persistent slot (`req_idx`) and keeps the token history on the
device (`req_states.all_token_ids`, valid up to `total_len`), so the controller's slots
are the runner's slots and the last sampled token is a device gather: no per-row Python
at all. The prompt reaches the device only after admission, so a new slot's thinking
phase is read from its history in `apply_staged_writes`.

V2 has no removal hook: a slot's outcome record is read when the slot is reused.
Speculative-decoding draft rows (local position > 0) are left alone.
"""
from __future__ import annotations

import numpy as np
import torch
from ttc_vllm.control import ThinkingController
from ttc_vllm_plugins import logits_common as common
from ttc_vllm_plugins import vllm_compat


class TTCLogitsProcessorV2:
    """The V2 implementation behind `TTCLogitsProcessor` (ttc_vllm_plugins/logits.py)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        common.validate_params(sampling_params)

    def __init__(self, vllm_config, req_states, context: common.EngineContext | None = None):
        self.req_states = req_states
        self.device = torch.device(req_states.device)
        self.ctx = context if context is not None else common.EngineContext.from_vllm_config(vllm_config)
        n = req_states.max_num_reqs
        self.ctrl = (ThinkingController(n, self.ctx.markers, self.device)
                     if self.ctx.markers is not None else None)
        self.active = np.zeros(n, dtype=bool)      # host mirror: skip batches without ttc rows
        self._new_slots: list[int] = []

    def add_request(self, req_idx: int, sampling_params) -> bool:
        if self.ctrl is None:
            return False
        if self.ctrl.is_active(req_idx):           # the slot's previous occupant finished
            common.retire(self.ctrl, req_idx)
        if req_idx in self._new_slots:
            self._new_slots.remove(req_idx)
        opts = common.options_or_none(sampling_params)
        admitted = opts is not None and common.admit(self.ctrl, req_idx, self.ctx, opts,
                                                     sampling_params)
        self.active[req_idx] = admitted
        if not admitted:
            return False
        self._new_slots.append(req_idx)
        return True

    def apply_staged_writes(self) -> None:
        if not self._new_slots:
            return
        slots = self._new_slots
        self._new_slots = []
        prefill, prompt, tokens = vllm_compat.v2_admission_state(self.req_states, slots)
        prefill, prompt = prefill.astype(np.int64), prompt.astype(np.int64)
        idx = torch.tensor(slots, dtype=torch.long).to(self.device)
        width = max(int(prefill.max()), 1)         # host numbers: no device sync
        history = tokens[idx, :width].long()
        self.ctrl.init_from_history(idx, history, torch.from_numpy(prefill).to(self.device),
                                    torch.from_numpy(prefill - prompt).to(self.device))

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        if self.ctrl is None or not self.active[vllm_compat.v2_host_slots(ctx)].any():
            return logits
        rows, local_pos, total_len, prompt_len, tokens = vllm_compat.v2_step_rows(self.req_states, ctx)
        slots = rows.long()
        slots = torch.where(local_pos == 0, slots, torch.full_like(slots, -1))
        safe = slots.clamp(min=0)
        total = total_len[safe].long()
        last = tokens[safe, (total - 1).clamp(min=0)].long()
        out_len = total - prompt_len[safe].long()
        return self.ctrl.step(logits, slots, last, out_len)
