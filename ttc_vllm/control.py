"""The batched in-engine controller shared by both vLLM logits-processor interfaces.

No vLLM import. Requests live in *slots*; the plugins map their batch rows to slots (V1:
own row->slot table; V2: the runner's persistent request index). All per-slot state sits
on the logits' device; `step` advances it by the token each row sampled last and edits
the logits in place with tensor ops only (no host sync). On CPU the same step runs as one
numba kernel over the same state (ttc_vllm/control_cpu.py; `step_backend`), held to this
torch step by the tests.

Phases of a slot:
  BEFORE     waiting for `<think>` (also after `</think>`, as ANSWERING: a new `<think>`
             reopens thinking)
  THINKING   free thinking: counted, watched by budget / halting / min-think rules
  FORCING    emitting a forced token sequence one token per step:
             CONCLUSION = conclusion ids + `</think>` [+ answer prefix ids] (budget hit,
             or halting "conclude"; the answer prefix, s1's "Final Answer:", makes a cut
             trace answer instead of thinking on after `</think>`),
             CONTINUATION = e.g. "\\nWait," (model tried to end before min_think),
             EOS = [eos] (halting "stop")
  ANSWERING  after `</think>`
  DONE       EOS forced

Accounting (see ttc_vllm/budget.py): thinking tokens = tokens after `<think>` before
`</think>`, forced ones included. Budget forcing starts when the room left
`min(cap - thinking, out_limit - output)` fits only the conclusion, so no request exceeds
its cap. A last token of -1 (async-scheduling placeholder) advances a forced sequence
(the forced token is certain: every other logit is -inf) but is otherwise not counted.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ttc_vllm import halting as H

from ttc_vllm.control_state import (  # noqa: F401 -- the state layout, re-exported
    C_CAP, C_CONC_END, C_COUNT, C_EXT, C_FPOS, C_HABOVE, C_HMIN, C_HON, C_HSTEP, C_HSTOP,
    C_HTOPK, C_KIND, C_LEN_CONC, C_LEN_CONT, C_LEN_EOS, C_MAXEXT, C_MIN, C_OUTLIM, C_PHASE,
    C_REASON, C_SEEN, C_SIGNAL, F_PENDING, F_TAU, FLOAT32_MAX, NUM_INT_COLS, PHASE_ANSWERING,
    PHASE_BEFORE, PHASE_DONE, PHASE_FORCING, PHASE_INACTIVE, PHASE_NAMES, PHASE_THINKING,
    REASON_BUDGET, REASON_HALT, REASON_NAMES, REASON_NATURAL, REASON_NONE, REASON_STOP,
    SEQ_CONCLUSION, SEQ_CONTINUATION, SEQ_EOS, UNLIMITED,
)

# Halting work a step does, host-known from the active slots' signals: bit flags (0 = none).
HALT_OFF, HALT_CONFIDENCE, HALT_ENTROPY, HALT_SAMPLED = 0, 1, 2, 4
STEP_ENV = "TTC_VLLM_STEP"   # auto | numba | compile | eager (see `step_backend`)
BACKENDS = ("numba", "compile", "eager")
logger = logging.getLogger("ttc_vllm.control")


@dataclass(frozen=True)
class Markers:
    """Token ids of the thinking markers (Qwen3 / DeepSeek-R1 / testbed style)."""

    think_start: int
    think_end: int


@dataclass(frozen=True)
class HaltingParams:
    signal: int
    aggregate: int
    top_k: int
    window: int
    threshold: float
    above: bool
    stop: bool          # action "stop" (force EOS) instead of "conclude"
    min_tokens: int

    @classmethod
    def from_options(cls, h) -> HaltingParams:
        """From a `HaltingOptions` whose threshold is numeric (resolved)."""
        return cls(H.signal_code(h.signal), H.aggregate_code(h.aggregate), h.top_k, h.window,
                   float(h.threshold), h.direction == "above", h.action == "stop", h.min_tokens)


@dataclass(frozen=True)
class SlotParams:
    """Everything `add` needs for one request, already resolved to token ids and numbers."""

    think_cap: int | None = None
    out_limit: int | None = None
    min_think: int = 0
    max_extensions: int = 0
    conclusion_ids: tuple[int, ...] = ()
    answer_prefix_ids: tuple[int, ...] = ()  # forced after `</think>` of a forced conclusion
    continuation_ids: tuple[int, ...] = ()
    suppress_ids: tuple[int, ...] = ()   # stop tokens blocked below min_think (</think> always)
    eos_id: int | None = None            # forced by halting action "stop"
    halting: HaltingParams | None = None
    # Initial state, from the token history at admission (see `scan_think_state`).
    phase: int = PHASE_BEFORE
    thinking_tokens: int = 0
    output_tokens: int = 0

    @classmethod
    def from_options(cls, options, *, encode: Callable[[str], Sequence[int]],
                     max_tokens: int | None, stop_ids: Sequence[int] = (),
                     eos_id: int | None = None, model: str | None = None,
                     calibration: dict | None = None, **initial) -> SlotParams:
        """Resolve a `TTCOptions` (budget tables, answer reserve, calibrated threshold)."""
        rb = options.resolve_budget(max_tokens, model)
        h = options.resolved_halting(calibration)
        return cls(
            think_cap=rb.think_cap, out_limit=rb.out_limit, min_think=rb.min_think,
            max_extensions=options.max_extensions,
            conclusion_ids=tuple(encode(options.conclusion)) if options.conclusion else (),
            answer_prefix_ids=tuple(encode(options.answer_prefix)) if options.answer_prefix else (),
            continuation_ids=tuple(encode(options.continuation)) if options.continuation else (),
            suppress_ids=tuple(sorted(set(stop_ids) | ({eos_id} if eos_id is not None else set()))),
            eos_id=eos_id,
            halting=HaltingParams.from_options(h) if h is not None else None,
            **initial)


@dataclass(frozen=True)
class SlotRecord:
    """What happened to a request's thinking, read once at removal."""

    phase: str
    reason: str             # none | natural | budget | halt | stop
    thinking_tokens: int
    stop_step: int | None   # thinking tokens when thinking ended / forcing began
    extensions: int


def scan_think_state(history: torch.Tensor, lengths: torch.Tensor, markers: Markers
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(phase, thinking tokens) per row of a token history [N, T] with valid lengths [N]:
    THINKING with the tokens after an unclosed last `<think>` counted (a prompt ending in
    `<think>` starts thinking at 0), else BEFORE."""
    pos = torch.arange(history.shape[1], device=history.device)[None, :]
    valid = pos < lengths[:, None]
    none = torch.full_like(pos, -1)
    last_start = torch.where(valid & (history == markers.think_start), pos, none).amax(-1)
    last_end = torch.where(valid & (history == markers.think_end), pos, none).amax(-1)
    thinking = last_start > last_end
    phase = torch.where(thinking, PHASE_THINKING, PHASE_BEFORE)
    count = torch.where(thinking, lengths - last_start - 1, torch.zeros_like(lengths))
    return phase.long(), count.long()


def scan_think_ids(history: Sequence[int], markers: Markers) -> tuple[int, int]:
    """`scan_think_state` of one host token list (V1 admission): two reverse searches at
    C speed instead of ~10 small tensor ops."""
    backwards = list(reversed(history))   # one copy for both searches

    def last(token: int) -> int:
        try:
            return len(history) - 1 - backwards.index(token)
        except ValueError:
            return -1

    start, end = last(markers.think_start), last(markers.think_end)
    if start > end:
        return PHASE_THINKING, len(history) - start - 1
    return PHASE_BEFORE, 0


def thinking_tokens_of(prompt_ids: Sequence[int], output_ids: Sequence[int], markers: Markers) -> int:
    """Thinking tokens a finished request generated, by the controller's accounting: tokens
    after `<think>` before `</think>` (forced ones included), counting from the prompt's
    open `<think>` when the chat template opened thinking there; the first thinking block
    of the output otherwise. Two C-speed searches, for once per request."""
    phase, before = scan_think_ids(prompt_ids, markers)
    output = list(output_ids)
    if phase == PHASE_THINKING:
        start = -1
    else:
        try:
            start = output.index(markers.think_start)
        except ValueError:
            return 0
        before = 0
    try:
        end = output.index(markers.think_end, start + 1)
    except ValueError:
        end = len(output)
    return before + end - start - 1


class ThinkingController:
    """Per-slot thinking state for up to `num_slots` requests, stepped as a batch."""

    def __init__(self, num_slots: int, markers: Markers, device: torch.device | str = "cpu",
                 seq_capacity: int = 32, suppress_capacity: int = 8, window: int = 64,
                 backend: str | None = None):
        self.num_slots = num_slots     # + one null slot (the last row): rows without a slot
                                       # point there, and it stays INACTIVE
        self.markers = markers
        self.device = torch.device(device)
        self.marker_ids = torch.tensor([markers.think_start, markers.think_end], device=self.device)
        self.backend = step_backend(self.device) if backend is None else backend
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "numba" and self.device.type != "cpu":
            raise ValueError("the numba step backend runs on CPU only")
        self._advance_fn = compiled_advance() if self.backend == "compile" else ThinkingController._advance
        self._views: tuple | None = None      # numpy views of the state (numba backend)
        self._arange = np.arange(0)
        self._no_rows = np.zeros(0, dtype=np.float32)
        n = num_slots + 1
        self.ints = torch.zeros(n, NUM_INT_COLS, dtype=torch.long, device=self.device)
        self.floats = torch.zeros(n, 2, dtype=torch.float32, device=self.device)
        self.seqs = torch.full((n, 3, seq_capacity), markers.think_end, dtype=torch.long,
                               device=self.device)
        self.suppress = torch.full((n, suppress_capacity), markers.think_end, dtype=torch.long,
                                   device=self.device)
        self.windows = H.SignalWindows(n, window, self.device)
        # The last step's top-20 of each slot, for `sampled_margin` (scored one step later).
        self.top_ids = torch.full((n, H.MAX_TOP_K), -1, dtype=torch.long, device=self.device)
        self.top_logprobs = torch.zeros(n, H.MAX_TOP_K, dtype=torch.float32, device=self.device)
        # Host-side bookkeeping only (no device reads): which optional work a step needs.
        self._active: set[int] = set()
        self._halting: dict[int, int] = {}     # slot -> signal code
        self._mode = HALT_OFF                  # halting work a step needs, from `_halting`
        if self.backend == "numba":
            self._warm_up()

    def _warm_up(self) -> None:
        from ttc_vllm import control_cpu   # numba: compiled on first use, on CPU only

        self._cpu = control_cpu            # the step reads the kernel from here, not by import
        try:
            control_cpu.warm_up(self)
        except Exception:
            logger.exception("ttc-vllm: building the numba controller step failed; running it eagerly")
            self.backend = "eager"

    # ---- admission / removal (host, once per request) ---------------------------------

    def is_active(self, slot: int) -> bool:
        return slot in self._active

    def add(self, slot: int, p: SlotParams) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")
        conc = list(p.conclusion_ids) + [self.markers.think_end] + list(p.answer_prefix_ids)
        cont = list(p.continuation_ids)
        eos = [p.eos_id] if p.eos_id is not None else [self.markers.think_end]
        self._fit_seqs(max(len(conc), len(cont), 1))
        seq_rows = np.full((3, self.seqs.shape[2]), self.markers.think_end, dtype=np.int64)
        for k, ids in ((SEQ_CONCLUSION, conc), (SEQ_CONTINUATION, cont), (SEQ_EOS, eos)):
            seq_rows[k, :len(ids)] = ids
        sup = sorted(set(p.suppress_ids) | {self.markers.think_end})
        self._fit_suppress(len(sup))
        sup_row = np.full(self.suppress.shape[1], self.markers.think_end, dtype=np.int64)
        sup_row[:len(sup)] = sup

        row = [0] * NUM_INT_COLS
        row[C_PHASE] = p.phase
        row[C_COUNT] = p.thinking_tokens
        row[C_SEEN] = p.output_tokens
        row[C_CAP] = UNLIMITED if p.think_cap is None else p.think_cap
        row[C_OUTLIM] = UNLIMITED if p.out_limit is None else p.out_limit
        row[C_MIN] = p.min_think
        row[C_MAXEXT] = p.max_extensions if cont else 0
        row[C_LEN_CONC], row[C_LEN_CONT], row[C_LEN_EOS] = len(conc), len(cont), len(eos)
        row[C_CONC_END] = len(p.conclusion_ids)  # index of `</think>` in the conclusion sequence
        h = p.halting
        if h is not None:
            row[C_HON], row[C_HTOPK], row[C_HABOVE] = 1, h.top_k, int(h.above)
            row[C_HSTOP], row[C_HMIN], row[C_SIGNAL] = int(h.stop), h.min_tokens, h.signal
            self.windows.reset(slot, h.signal, h.aggregate, h.window)
        # Defence in depth: options are bounded at validation (ttc_vllm/limits.py), but no
        # value that reaches the engine may raise here (an OverflowError kills the engine).
        row = [min(max(v, 0), UNLIMITED) for v in row]
        tau = min(max(h.threshold, -FLOAT32_MAX), FLOAT32_MAX) if h else 0.0
        for tensor, values in ((self.ints, np.asarray(row, dtype=np.int64)),
                               (self.floats, np.array([tau, 0.0], np.float32)),
                               (self.seqs, seq_rows), (self.suppress, sup_row)):
            H.write_row(tensor, slot, values)
        self._active.add(slot)
        self._views = None   # _fit_* / windows.reset may have reallocated state tensors
        if h is not None:
            self._halting[slot] = h.signal
        else:
            self._halting.pop(slot, None)
        self._mode = halting_mode(self._halting.values())

    def init_from_history(self, slots: torch.Tensor, history: torch.Tensor,
                          lengths: torch.Tensor, output_tokens: torch.Tensor) -> None:
        """Set phase / thinking tokens / consumed output of `slots` from their token
        history on device (Model Runner V2 sees the prompt only after admission)."""
        phase, count = scan_think_state(history, lengths, self.markers)
        self.ints[slots, C_PHASE] = phase
        self.ints[slots, C_COUNT] = count
        self.ints[slots, C_SEEN] = output_tokens.long()

    def record(self, slot: int) -> SlotRecord:
        """Host read of one slot's outcome (a device sync: call at removal only)."""
        cols = [C_PHASE, C_REASON, C_COUNT, C_HSTEP, C_EXT]
        state = self.ints.numpy() if self.device.type == "cpu" else self.ints
        phase, reason, count, hstep, ext = state[slot, cols].tolist()
        ended = reason != REASON_NONE
        return SlotRecord(PHASE_NAMES[phase], REASON_NAMES[reason], count,
                          hstep if ended else None, ext)

    def remove(self, slot: int) -> SlotRecord | None:
        if slot not in self._active:
            return None
        rec = self.record(slot)
        H.write_row(self.ints, (slot, C_PHASE), PHASE_INACTIVE)
        self._active.discard(slot)
        self._halting.pop(slot, None)
        self._mode = halting_mode(self._halting.values())
        return rec

    def _fit_seqs(self, length: int) -> None:
        if length > self.seqs.shape[2]:
            extra = self.seqs.new_full((self.seqs.shape[0], 3, length - self.seqs.shape[2]),
                                       self.markers.think_end)
            self.seqs = torch.cat([self.seqs, extra], dim=2)

    def _fit_suppress(self, length: int) -> None:
        if length > self.suppress.shape[1]:
            extra = self.suppress.new_full((self.suppress.shape[0], length - self.suppress.shape[1]),
                                           self.markers.think_end)
            self.suppress = torch.cat([self.suppress, extra], dim=1)

    # ---- the per-step hot path ---------------------------------------------------------

    def step(self, logits: torch.Tensor, slots: torch.Tensor, last_tokens: torch.Tensor,
             output_tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Advance every row's slot by its last sampled token, then edit its logits.

        logits [B, V] (edited in place and returned); rows [R] the logits rows to handle
        (None = all B rows, R = B); slots [R] their slots (-1 = not controlled);
        last_tokens [R] each row's last output token (-1 = none / placeholder);
        output_tokens [R] each row's output length (a token is new when it grew).
        """
        if not self._active:
            return logits
        if self.backend == "numba" and _cpu_kernel_supports(logits):
            try:
                self._kernel_step(logits, slots, last_tokens, output_tokens, rows)
                return logits
            except Exception:
                # a new argument type (e.g. float64 logits) compiles before any state is touched
                logger.exception("ttc-vllm: the numba controller step failed; running it eagerly")
                self.backend = "eager"
        dev = self.device
        sub = logits if rows is None else logits.index_select(0, rows)
        args = (sub, slots.to(dev).long(), last_tokens.to(dev).long(), output_tokens.to(dev).long(),
                self._mode)
        try:
            self._advance_fn(self, *args)
        except Exception:
            if self.backend != "compile":
                raise
            # A compiler failure happens before the graph runs (state untouched): go eager.
            logger.exception("ttc-vllm: compiling the controller step failed; running it eagerly")
            self.backend, self._advance_fn = "eager", ThinkingController._advance
            self._advance_fn(self, *args)
        if rows is not None:
            logits.index_copy_(0, rows, sub)
        return logits

    def _kernel_step(self, logits: torch.Tensor, slots: torch.Tensor, last: torch.Tensor,
                     out_len: torch.Tensor, rows: torch.Tensor | None) -> None:
        cpu = self._cpu
        if self._views is None:
            self._views = cpu.state_views(self)
        if rows is None:
            if self._arange.shape[0] != logits.shape[0]:
                self._arange = np.arange(logits.shape[0], dtype=np.int64)
            rows_np = self._arange
        else:
            rows_np = _int64_numpy(rows)
        slots_np, last_np = _int64_numpy(slots), _int64_numpy(last)
        # Passes over the whole vocabulary run vectorized before the kernel, on the rows
        # that may still be thinking after this step (the others never use their signal).
        x = logits.numpy()
        lse_here = False
        if self._mode == HALT_OFF:
            top, lse, neg_ent = x[:, :0], self._no_rows, self._no_rows
        elif x.shape[1] <= cpu.SORT_MAX_VOCAB:
            # small vocabulary: one sort call here, log-sum-exp and -H inside the kernel
            top, lse, neg_ent = cpu.top_logits(x, bool(self._mode & HALT_CONFIDENCE)), self._no_rows, self._no_rows
            lse_here = True
        else:
            need = cpu.needs_signal(self._views[0], rows_np, slots_np, last_np, self.markers.think_start)
            top, lse, neg_ent = cpu.vocabulary_passes(logits, bool(self._mode & HALT_CONFIDENCE),
                                                      bool(self._mode & HALT_ENTROPY), need)
        cpu.step_kernel(x, top, lse, neg_ent, lse_here, rows_np, slots_np, last_np,
                        _int64_numpy(out_len), self.markers.think_start, self.markers.think_end,
                        *self._views)

    def _advance(self, sub: torch.Tensor, slots: torch.Tensor, last: torch.Tensor,
                 out_len: torch.Tensor, mode: int) -> None:
        """The step body: tensor ops only, no host reads, so `torch.compile` fuses it into
        one kernel call. Everything that differs between engines (slot count, marker ids,
        sequence capacities) is read from tensors, so one compiled graph per halting
        `mode` serves every controller; `mode` (host-known flags) skips the top-k of token
        confidence or the softmax of entropy when no row needs it, and all halting work
        when no row halts."""
        null_slot = self.ints.shape[0] - 1
        think_start, think_end = self.marker_ids[0], self.marker_ids[1]
        s = torch.where(slots < 0, null_slot, slots)
        st = self.ints[s]                                      # [R, C]
        fl = self.floats[s]
        ph, count, kind, fpos = st[:, C_PHASE], st[:, C_COUNT], st[:, C_KIND], st[:, C_FPOS]
        cap_len = self.seqs.shape[2]
        seq = self.seqs[s, kind]                               # [R, L] current forced seq
        seq_len = st[:, C_LEN_CONC:C_LEN_EOS + 1].gather(1, kind[:, None]).squeeze(1)

        # 1. Advance by the last sampled token.
        new = out_len > st[:, C_SEEN]
        forcing = ph == PHASE_FORCING
        expected = seq.gather(1, fpos.clamp(max=cap_len - 1)[:, None]).squeeze(1)
        tok = torch.where(last >= 0, last, torch.where(forcing, expected, -1))
        has = new & (tok >= 0)
        is_end = tok == think_end
        follows = has & forcing & (tok == expected)
        fpos1 = fpos + follows.long()
        seq_done = follows & (fpos1 >= seq_len)
        broke = has & forcing & ~follows
        in_think = (ph == PHASE_THINKING) | forcing
        eos_forced = forcing & (kind == SEQ_EOS)   # a forced EOS ends the request, not a thought
        # forced answer-prefix tokens (after the conclusion's `</think>`) are answer, not thought
        past_end = forcing & (kind == SEQ_CONCLUSION) & (fpos > st[:, C_CONC_END])
        count1 = count + (has & in_think & ~is_end & ~eos_forced & ~past_end).long()
        h_on = st[:, C_HON] > 0
        if mode != HALT_OFF:
            r = fl[:, F_PENDING]
            if mode & HALT_SAMPLED:   # scored now that the token sampled from them is known
                k = min(H.MAX_TOP_K, sub.shape[-1])
                margin = H.sampled_margin(self.top_ids[s, :k], self.top_logprobs[s, :k], tok)
                r = torch.where(st[:, C_SIGNAL] == H.SIGNAL_SAMPLED, margin, r)
            self.windows.push(s, r, has & (ph == PHASE_THINKING) & ~is_end & h_on)
        reopen = has & ((ph == PHASE_BEFORE) | (ph == PHASE_ANSWERING)) & (tok == think_start)
        ph1 = torch.where(reopen, PHASE_THINKING, ph)
        ph1 = torch.where((seq_done & (kind == SEQ_CONTINUATION)) | (broke & ~past_end),
                          PHASE_THINKING, ph1)
        # `</think>` ends thinking, unless a forced answer prefix still follows it; a done
        # (or broken) answer prefix hands over to the model's answer
        answering = ((has & in_think & is_end & ~(follows & ~seq_done))
                     | (seq_done & (kind == SEQ_CONCLUSION)) | (broke & past_end))
        ph1 = torch.where(answering, PHASE_ANSWERING, ph1)
        ph1 = torch.where(seq_done & (kind == SEQ_EOS), PHASE_DONE, ph1)
        reason, hstep = st[:, C_REASON], st[:, C_HSTEP]
        natural = has & (ph == PHASE_THINKING) & is_end & (reason == REASON_NONE)
        reason = torch.where(natural, REASON_NATURAL, reason)
        hstep = torch.where(natural, count1, hstep)

        # 2. Decide: budget > halting > min-think extension.
        free = ph1 == PHASE_THINKING
        cont_forcing = (ph1 == PHASE_FORCING) & (kind == SEQ_CONTINUATION)
        conc_len = st[:, C_CONC_END]   # conclusion tokens before `</think>`
        left = torch.minimum(st[:, C_CAP] - count1, st[:, C_OUTLIM] - out_len)
        budget_hit = (free | cont_forcing) & (left <= conc_len)
        min_think = st[:, C_MIN]
        trig = torch.zeros_like(budget_hit)
        if mode != HALT_OFF:
            f, fvalid = self.windows.value(s)
            eligible = (free & h_on & ~budget_hit & (count1 >= st[:, C_HMIN])
                        & (count1 >= min_think))
            trig = H.halt_decision(f, fvalid & eligible, fl[:, F_TAU], st[:, C_HABOVE] > 0)
        h_stop = st[:, C_HSTOP] > 0
        below = free & (count1 < min_think)
        sup = self.suppress[s]
        # a stop id outside the logits (vLLM rejects those at admission) cannot index them
        sup = torch.where((sup >= 0) & (sup < sub.shape[-1]), sup, think_end)
        tries = (sup == sub.argmax(-1)[:, None]).any(-1)
        attempt = below & tries & ~budget_hit & ~trig & (st[:, C_EXT] < st[:, C_MAXEXT])
        start = budget_hit | trig | attempt
        new_kind = torch.where(budget_hit | (trig & ~h_stop), SEQ_CONCLUSION,
                               torch.where(trig, SEQ_EOS, SEQ_CONTINUATION))
        kind2 = torch.where(start, new_kind, kind)
        start_pos = torch.where(budget_hit & (left < conc_len), conc_len, 0)
        fpos2 = torch.where(start, start_pos, fpos1)
        ph2 = torch.where(start, PHASE_FORCING, ph1)
        ended = budget_hit | trig
        reason = torch.where(budget_hit, REASON_BUDGET,
                             torch.where(trig, torch.where(h_stop, REASON_STOP, REASON_HALT), reason))
        hstep = torch.where(ended, count1, hstep)
        if mode != HALT_OFF:
            # The signal of these logits is pushed next step only if the row is then
            # thinking: other rows keep their old pending values (the CPU kernel skips
            # their vocabulary passes).
            raw, top_ids, top_lp = H.raw_signal(
                sub, st[:, C_SIGNAL], st[:, C_HTOPK].clamp(1, H.MAX_TOP_K),
                need_confidence=bool(mode & HALT_CONFIDENCE), need_entropy=bool(mode & HALT_ENTROPY),
                need_top=bool(mode & HALT_SAMPLED))
            keep = ph2 == PHASE_THINKING
            self.floats[s, F_PENDING] = torch.where(keep, raw.float(), fl[:, F_PENDING])
            if top_ids is not None:
                k = top_ids.shape[1]
                self.top_ids[s, :k] = torch.where(keep[:, None], top_ids, self.top_ids[s, :k])
                self.top_logprobs[s, :k] = torch.where(keep[:, None], top_lp, self.top_logprobs[s, :k])

        # 3. Write the state back (one scatter per matrix).
        st = st.clone()
        st[:, C_PHASE], st[:, C_COUNT], st[:, C_KIND], st[:, C_FPOS] = ph2, count1, kind2, fpos2
        st[:, C_SEEN] = torch.where(new, out_len, st[:, C_SEEN])
        st[:, C_EXT] = st[:, C_EXT] + attempt.long()
        st[:, C_REASON], st[:, C_HSTEP] = reason, hstep
        self.ints[s] = st

        # 4. Edit the logits: block stop tokens below min_think, then force sequences.
        block = (ph2 == PHASE_THINKING) & (count1 < min_think)
        sub.scatter_(1, sup, torch.where(block[:, None], float("-inf"), sub.gather(1, sup)))
        forced = ph2 == PHASE_FORCING
        ftok = self.seqs[s, kind2].gather(1, fpos2.clamp(max=cap_len - 1)[:, None])   # [R, 1]
        keep = sub.gather(1, ftok)
        sub.masked_fill_(forced[:, None], float("-inf"))
        sub.scatter_(1, ftok, torch.where(forced[:, None], 0.0, keep))


def halting_mode(signal_codes) -> int:
    """The HALT_* flags of the work the given halting signals need each step."""
    codes = set(signal_codes)
    return ((HALT_CONFIDENCE if codes & {H.SIGNAL_TOKEN, H.SIGNAL_GROUP} else HALT_OFF)
            | (HALT_ENTROPY if H.SIGNAL_ENTROPY in codes else HALT_OFF)
            | (HALT_SAMPLED if H.SIGNAL_SAMPLED in codes else HALT_OFF))


def step_backend(device: torch.device) -> str:
    """TTC_VLLM_STEP: `auto` runs the numba kernel on CPU, where the ~100 small tensor ops
    of the torch step cost far more in dispatch than in arithmetic (and a compiled graph
    still pays dynamo's guards each step); GPUs run the eager torch step, whose ops queue
    asynchronously. `compile` (torch.compile of the torch step) and `eager` force a torch step."""
    value = os.environ.get(STEP_ENV, "auto").strip().lower()
    if value == "auto":
        if device.type != "cpu":
            return "eager"
        try:
            import numba  # noqa: F401  (a vLLM dependency; absent only in unusual installs)
        except ImportError:
            return "compile"
        return "numba"
    if value not in BACKENDS:
        raise ValueError(f"{STEP_ENV} must be auto, {', '.join(BACKENDS)}; got {value!r}")
    if value == "numba" and device.type != "cpu":
        return "eager"   # the kernel edits CPU memory; a GPU engine keeps the torch step
    return value


def _cpu_kernel_supports(logits: torch.Tensor) -> bool:
    return logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64) \
        and logits.is_contiguous()


def _int64_numpy(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.dtype == torch.long and t.is_contiguous() else t.long().contiguous().numpy()


_COMPILED_ADVANCE = None


def compiled_advance():
    """One compiled step body for every controller in the process (graphs are cached on
    disk by inductor, so a warm engine start pays ~1-2 s per halting mode, a cold one ~15 s)."""
    global _COMPILED_ADVANCE
    if _COMPILED_ADVANCE is None:
        # 8 halting modes x (batch of 1 | more: dynamo specializes size 1) exceed the default
        # 8 graphs per function; leave room so a new variant never silently runs eagerly.
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 32)
        _COMPILED_ADVANCE = torch.compile(ThinkingController._advance, dynamic=True)
    return _COMPILED_ADVANCE
