"""TTC controls as a logits processor of vLLM's V1 model runner (CPU; GPU with
VLLM_USE_V2_MODEL_RUNNER=0).

Rows of the persistent batch map to controller slots through a host table (moves swap
table entries; no tensor copies). Each step the only per-row Python is the gather of each
row's last output token and length from the live `output_ids` lists; the rest is
`ThinkingController.step` (on CPU one numba kernel call, elsewhere torch ops on the
logits' device).
"""
from __future__ import annotations

import numpy as np
import torch
from ttc_vllm.control import ThinkingController, scan_think_ids
from ttc_vllm_plugins import logits_common as common
from ttc_vllm_plugins import vllm_compat


class TTCLogitsProcessorV1:
    """The V1 implementation behind `TTCLogitsProcessor` (ttc_vllm_plugins/logits.py)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        common.validate_params(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool,
                 context: common.EngineContext | None = None):
        self.device = torch.device(device)
        self.pin_memory = is_pin_memory and self.device.type != "cpu"
        self.ctx = context if context is not None else common.EngineContext.from_vllm_config(vllm_config)
        self.max_slots = vllm_config.scheduler_config.max_num_seqs
        self.swap = vllm_compat.v1_move_swap()
        self.ctrl = (ThinkingController(self.max_slots, self.ctx.markers, self.device)
                     if self.ctx.markers is not None else None)
        self.free_slots = list(range(self.max_slots - 1, -1, -1))
        self.row_slot: dict[int, int] = {}
        self.row_out: dict[int, list[int]] = {}
        self._rows: list[int] = []
        self._outs: list[list[int]] = []
        self._rows_t: torch.Tensor | None = None
        self._slots_t: torch.Tensor | None = None

    def is_argmax_invariant(self) -> bool:
        return False  # forcing and suppression change greedy picks

    # ---- batch bookkeeping (host, on batch changes only) --------------------------------

    def _drop(self, row: int) -> None:
        slot = self.row_slot.pop(row, None)
        self.row_out.pop(row, None)
        if slot is not None:
            common.retire(self.ctrl, slot)
            self.free_slots.append(slot)

    def _add(self, row: int, params, prompt_ids: list[int] | None, output_ids: list[int]) -> None:
        opts = common.options_or_none(params)
        if opts is None or not self.free_slots:
            return
        phase, count = scan_think_ids(list(prompt_ids or ()) + list(output_ids), self.ctx.markers)
        slot = self.free_slots.pop()
        if not common.admit(self.ctrl, slot, self.ctx, opts, params, phase=phase,
                            thinking_tokens=count, output_tokens=len(output_ids)):
            self.free_slots.append(slot)
            return
        self.row_slot[row] = slot
        self.row_out[row] = output_ids

    def update_state(self, batch_update) -> None:
        if self.ctrl is None or not batch_update:
            return
        for row in batch_update.removed:
            self._drop(row)
        for row, params, prompt_ids, output_ids in batch_update.added:
            self._drop(row)  # a finished request's row reused without a removal entry
            self._add(row, params, prompt_ids, output_ids)
        for a, b, direction in batch_update.moved:
            if direction == self.swap:
                for table in (self.row_slot, self.row_out):
                    va, vb = table.pop(a, None), table.pop(b, None)
                    if va is not None:
                        table[b] = va
                    if vb is not None:
                        table[a] = vb
            else:
                self._drop(b)   # b was a finished request's row (condense fills holes)
                if a in self.row_slot:
                    self.row_slot[b] = self.row_slot.pop(a)
                    self.row_out[b] = self.row_out.pop(a)
        self._rows = sorted(self.row_slot)
        self._outs = [self.row_out[r] for r in self._rows]
        self._slots_t = self._to_device([self.row_slot[r] for r in self._rows])
        all_rows = self._rows == list(range(batch_update.batch_size))
        self._rows_t = None if all_rows else self._to_device(self._rows)

    def _to_device(self, values) -> torch.Tensor:
        """int64 host values (a list or an array) on the logits' device."""
        t = torch.from_numpy(np.asarray(values, dtype=np.int64))
        if self.device.type == "cpu":
            return t
        return (t.pin_memory() if self.pin_memory else t).to(self.device, non_blocking=True)

    # ---- hot path -----------------------------------------------------------------------

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        # The one per-row Python pass: last token and length of each live output list
        # (np.fromiter: a tenth of the time of torch.tensor on a list of tuples).
        n = len(self._outs)
        last = np.fromiter((o[-1] if o else -1 for o in self._outs), np.int64, n)
        lens = np.fromiter(map(len, self._outs), np.int64, n)
        return self.ctrl.step(logits, self._slots_t, self._to_device(last), self._to_device(lens),
                              rows=self._rows_t)
