"""The controller step as one numba kernel: the CPU backend of `ThinkingController`.

Same state, same rules as `ThinkingController._advance` (the torch reference, which
the GPU runs and the tests compare this against), written as a loop over the batch rows.
On CPU a step of ~100 small torch ops costs far more in dispatch than in arithmetic, and
even the compiled graph pays dynamo's guards and wrappers every step. The kernel's whole
budget step at batch 64 takes ~0.01 ms. With halting, the passes over the vocabulary are
split by what is fastest here: for small vocabularies the kernel computes log-sum-exp and -H
itself, on exactly the rows whose signal it uses (SIMD loops, `_row_lse`), and numpy's
SIMD sort gives the top-k before the call; for large vocabularies all of it runs as
vectorized torch passes before the call, on the rows that may still think
(`vocabulary_passes`).

Only rows with a slot are touched (the torch step also writes the null slot's bookkeeping;
nothing reads it). Halting values are computed for the rows whose own signal needs them.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from ttc_vllm import control_state as C
from ttc_vllm import halting as H

# numba folds module globals into the compiled code as constants.
THINKING, FORCING, BEFORE, ANSWERING, DONE = (C.PHASE_THINKING, C.PHASE_FORCING, C.PHASE_BEFORE,
                                              C.PHASE_ANSWERING, C.PHASE_DONE)
CONC, CONT, EOS = C.SEQ_CONCLUSION, C.SEQ_CONTINUATION, C.SEQ_EOS
R_NONE, R_NATURAL, R_BUDGET, R_HALT, R_STOP = (C.REASON_NONE, C.REASON_NATURAL, C.REASON_BUDGET,
                                               C.REASON_HALT, C.REASON_STOP)
(PHASE, COUNT, SEEN, CAP, OUTLIM, MIN, EXT, MAXEXT, KIND, FPOS, REASON, HSTEP, LEN_CONC, HON,
 HTOPK, HABOVE, HSTOP, HMIN, SIGNAL, CONC_END) = (
    C.C_PHASE, C.C_COUNT, C.C_SEEN, C.C_CAP, C.C_OUTLIM, C.C_MIN, C.C_EXT, C.C_MAXEXT, C.C_KIND,
    C.C_FPOS, C.C_REASON, C.C_HSTEP, C.C_LEN_CONC, C.C_HON, C.C_HTOPK, C.C_HABOVE, C.C_HSTOP,
    C.C_HMIN, C.C_SIGNAL, C.C_CONC_END)
TAU, PENDING = C.F_TAU, C.F_PENDING
S_TOKEN, S_GROUP, S_ENTROPY, S_SAMPLED = H.SIGNAL_TOKEN, H.SIGNAL_GROUP, H.SIGNAL_ENTROPY, H.SIGNAL_SAMPLED
A_MIN, A_TAIL = H.AGG_MIN, H.AGG_TAIL
MAX_TOP_K = H.MAX_TOP_K
NEG_INF = -math.inf
F32 = np.float32
LOG2E, LN2 = F32(1.4426950408889634), F32(0.6931471805599453)
LANES = 8   # explicit accumulators: LLVM does not vectorize a float max reduction by itself
# fastmath without "no NaNs / no infs": masked logits are -inf and must stay -inf
SIMD_MATH = {"reassoc", "contract", "arcp", "nsz", "afn"}


@numba.njit(cache=True, nogil=True, fastmath=SIMD_MATH)
def _row_max(x):
    v = x.shape[0]
    acc = np.full(LANES, NEG_INF, np.float32)
    j = 0
    while j + LANES <= v:
        for q in range(LANES):
            y = x[j + q]
            acc[q] = y if y > acc[q] else acc[q]
        j += LANES
    m = acc[0]
    for q in range(1, LANES):
        m = acc[q] if acc[q] > m else m
    while j < v:
        m = x[j] if x[j] > m else m
        j += 1
    return m


@numba.njit(cache=True, nogil=True, fastmath=SIMD_MATH)
def _row_lse(x, want_entropy, e, bits):
    """(log-sum-exp, -H) of one float32 row, as torch computes them to ~1e-6. numba has
    no vector exp (no SVML here), so exp is 2^n * 2^f with a degree-6 polynomial on
    |f| <= 1/2 and 2^n from the exponent bits, in loops LLVM vectorizes; terms below
    e^-87 (float32's smallest normal) count as 0. -H = sum e (x - m) / S - log S.
    `e`, `bits`: scratch of the row's length."""
    v = x.shape[0]
    m = _row_max(x)
    if m == NEG_INF:
        return NEG_INF, F32(0.0)
    for j in range(v):
        y = max((x[j] - m) * LOG2E, F32(-125.0))
        n = np.floor(y + F32(0.5))
        t = (y - n) * LN2
        e[j] = F32(1.0) + t * (F32(1.0) + t * (F32(0.5) + t * (F32(1 / 6) + t * (
            F32(1 / 24) + t * (F32(1 / 120) + t * F32(1 / 720))))))
        bits[j] = (np.int32(n) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    total = F32(0.0)
    weighted = F32(0.0)
    for j in range(v):
        d = x[j] - m
        live = d > F32(-87.0)
        ej = e[j] * scale[j] if live else F32(0.0)
        total += ej
        if want_entropy:
            weighted += ej * (d if live else F32(0.0))
    log_total = math.log(total)
    return m + log_total, (F32(weighted / total - log_total) if want_entropy else F32(0.0))


@numba.njit(cache=True, nogil=True)
def _top_insert(vals, ids, k, x, j):
    """Insert logit x (id j) into the descending top-k list vals/ids (x > vals[k-1])."""
    p = k - 1
    while p > 0 and vals[p - 1] < x:
        vals[p] = vals[p - 1]
        ids[p] = ids[p - 1]
        p -= 1
    vals[p] = x
    ids[p] = j


@numba.njit(cache=True, nogil=True)
def _row_signal(x, top_desc, lse, neg_entropy, signal, top_k, top_vals, top_ids):
    """r for one row of logits x, from what `vocabulary_passes` computed vectorized (its
    log-sum-exp, -H, its largest logits in descending order): C (token/group
    confidence), -H (entropy), or 0 for the sampled margin (scored next step), whose row
    top-20 log-probs and ids go into top_vals/top_ids."""
    if signal == S_ENTROPY:
        return neg_entropy
    v = x.shape[0]
    if signal == S_SAMPLED:
        k = min(MAX_TOP_K, v)
        for i in range(k):
            top_vals[i] = NEG_INF
            top_ids[i] = -1
        for j in range(v):
            if x[j] > top_vals[k - 1]:
                _top_insert(top_vals, top_ids, k, x[j], j)
        for i in range(k):
            top_vals[i] = np.float32(top_vals[i] - lse)
        return np.float32(0.0)
    total = 0.0
    n = 0
    for i in range(min(top_k, top_desc.shape[0])):
        lp = top_desc[i] - lse
        if math.isfinite(lp):
            total += lp
            n += 1
    return np.float32(-total / max(n, 1))


@numba.njit(cache=True, nogil=True)
def step_kernel(logits, top_desc, lse, neg_entropy, lse_here, rows, slots, last, out_len, think_start,
                think_end, ints, floats, seqs, suppress, top_ids, top_logprobs,
                w_window, w_signal, w_agg, w_n, w_cnt, w_sum, w_min, r_ring, v_ring, v_ok):
    """One controller step over the batch rows. With `lse_here` the kernel computes each
    signal row's log-sum-exp and -H itself (`lse`, `neg_entropy` unused); else they come
    precomputed by row. `top_desc`: each row's descending top logits (confidence rows)."""
    cap_len = seqs.shape[2]
    vocab = logits.shape[1]
    k_all = min(MAX_TOP_K, vocab)
    vals = np.empty(MAX_TOP_K, np.float64)
    idx = np.empty(MAX_TOP_K, np.int64)
    scratch_e = np.empty(vocab if lse_here else 0, np.float32)
    scratch_bits = np.empty(vocab if lse_here else 0, np.int32)
    for i in range(rows.shape[0]):
        s = slots[i]
        if s < 0:
            continue
        row = rows[i]
        x = logits[row]
        st = ints[s]
        ph, count, kind, fpos = st[PHASE], st[COUNT], st[KIND], st[FPOS]
        seq_len = st[LEN_CONC + kind]

        # 1. Advance by the last sampled token.
        new = out_len[i] > st[SEEN]
        forcing = ph == FORCING
        expected = seqs[s, kind, min(fpos, cap_len - 1)]
        tok = last[i] if last[i] >= 0 else (expected if forcing else -1)
        has = new and tok >= 0
        is_end = tok == think_end
        follows = has and forcing and tok == expected
        fpos1 = fpos + (1 if follows else 0)
        seq_done = follows and fpos1 >= seq_len
        broke = has and forcing and not follows
        in_think = ph == THINKING or forcing
        eos_forced = forcing and kind == EOS
        past_end = forcing and kind == CONC and fpos > st[CONC_END]
        count1 = count + (1 if has and in_think and not is_end and not eos_forced and not past_end else 0)
        h_on = st[HON] > 0
        signal = st[SIGNAL]
        if h_on and has and ph == THINKING and not is_end:
            r = floats[s, PENDING]
            if signal == S_SAMPLED:
                hit = NEG_INF
                for j in range(k_all):
                    if top_ids[s, j] == tok and top_logprobs[s, j] > hit:
                        hit = top_logprobs[s, j]
                r = np.float32(max(hit, top_logprobs[s, k_all - 1]) - top_logprobs[s, 0])
            # push r into the slot's window (SignalWindows.push)
            w = w_window[s]
            n0 = w_n[s]
            col = n0 % w
            r_ring[s, col] = r
            n1 = n0 + 1
            filled = min(n1, w)
            is_group = w_signal[s] == S_GROUP
            if is_group:
                g = np.float32(0.0)
                for j in range(filled):
                    g += r_ring[s, j]
                v = np.float32(g / max(filled, 1))
            else:
                v = np.float32(r)
            ok = (not is_group) or n1 >= w
            v_ring[s, col] = v
            v_ok[s, col] = ok
            if ok:
                w_sum[s] = w_sum[s] + v
                w_cnt[s] += 1
                w_min[s] = min(w_min[s], v)
            w_n[s] = n1
        ph1 = ph
        if has and (ph == BEFORE or ph == ANSWERING) and tok == think_start:
            ph1 = THINKING
        if (seq_done and kind == CONT) or (broke and not past_end):
            ph1 = THINKING
        if ((has and in_think and is_end and not (follows and not seq_done))
                or (seq_done and kind == CONC) or (broke and past_end)):
            ph1 = ANSWERING
        if seq_done and kind == EOS:
            ph1 = DONE
        reason, hstep = st[REASON], st[HSTEP]
        if has and ph == THINKING and is_end and reason == R_NONE:
            reason, hstep = R_NATURAL, count1

        # 2. Decide: budget > halting > min-think extension.
        free = ph1 == THINKING
        conc_len = st[CONC_END]
        left = min(st[CAP] - count1, st[OUTLIM] - out_len[i])
        budget_hit = (free or (ph1 == FORCING and kind == CONT)) and left <= conc_len
        min_think = st[MIN]
        trig = False
        if h_on:
            cnt = w_cnt[s]
            if (cnt > 0 and free and not budget_hit and count1 >= st[HMIN]
                    and count1 >= min_think):
                agg = w_agg[s]
                if agg == A_MIN:
                    f = w_min[s]
                elif agg == A_TAIL:
                    tail = np.float32(0.0)
                    tail_n = 0
                    for j in range(min(w_n[s], w_window[s])):
                        if v_ok[s, j]:
                            tail += v_ring[s, j]
                            tail_n += 1
                    f = np.float32(tail / max(tail_n, 1))
                else:
                    f = np.float32(w_sum[s] / max(cnt, 1))
                tau = floats[s, TAU]
                trig = f > tau if st[HABOVE] > 0 else f < tau
        h_stop = st[HSTOP] > 0
        attempt = False
        if free and count1 < min_think and not budget_hit and not trig and st[EXT] < st[MAXEXT]:
            best = 0
            for j in range(1, vocab):
                if x[j] > x[best]:
                    best = j
            for j in range(suppress.shape[1]):
                if suppress[s, j] == best:
                    attempt = True
        start = budget_hit or trig or attempt
        kind2, fpos2, ph2 = kind, fpos1, ph1
        if start:
            kind2 = CONC if (budget_hit or (trig and not h_stop)) else (EOS if trig else CONT)
            fpos2 = conc_len if (budget_hit and left < conc_len) else 0
            ph2 = FORCING
        if budget_hit:
            reason, hstep = R_BUDGET, count1
        elif trig:
            reason, hstep = (R_STOP if h_stop else R_HALT), count1
        # The signal of these logits is pushed next step only if the row is then thinking
        # (for large vocabularies `needs_signal` picked a superset of those rows for the
        # vocabulary passes; for small ones the kernel computes them here, for exactly these).
        if h_on and ph2 == THINKING:
            top_k = max(1, min(st[HTOPK], MAX_TOP_K))
            if lse_here:
                row_lse, row_neg_ent = _row_lse(x, signal == S_ENTROPY, scratch_e, scratch_bits)
            else:
                row_lse, row_neg_ent = lse[row], neg_entropy[row]
            raw = _row_signal(x, top_desc[row], row_lse, row_neg_ent, signal, top_k, vals, idx)
            floats[s, PENDING] = raw
            if signal == S_SAMPLED:
                for j in range(k_all):
                    top_ids[s, j] = idx[j]
                    top_logprobs[s, j] = vals[j]

        # 3. Write the state back.
        st[PHASE], st[COUNT], st[KIND], st[FPOS] = ph2, count1, kind2, fpos2
        if new:
            st[SEEN] = out_len[i]
        if attempt:
            st[EXT] += 1
        st[REASON], st[HSTEP] = reason, hstep

        # 4. Edit the logits: block stop tokens below min_think, then force sequences.
        # ids outside the logits are skipped (vLLM rejects such stop ids; never write past a row)
        if ph2 == THINKING and count1 < min_think:
            for j in range(suppress.shape[1]):
                sid = suppress[s, j]
                if 0 <= sid < vocab:
                    x[sid] = NEG_INF
        if ph2 == FORCING:
            ftok = seqs[s, kind2, min(fpos2, cap_len - 1)]
            if 0 <= ftok < vocab:
                for j in range(vocab):
                    x[j] = NEG_INF
                x[ftok] = 0.0


# numpy's SIMD sort of whole rows beats a top-k selection for small vocabularies only.
SORT_MAX_VOCAB = 4096


def needs_signal(ints, rows, slots, last, think_start: int):
    """The logits rows ([N] int64) whose signal the kernel may use: halting
    slots that are thinking, being forced (a continuation hands back to thinking) or
    reopening thinking with this token. A superset of the rows the kernel computes a
    signal for (those thinking after the step); done and answering rows drop out."""
    controlled = slots >= 0
    s = slots[controlled]
    ph = ints[s, PHASE]
    keep = (ints[s, HON] > 0) & ((ph == THINKING) | (ph == FORCING) | (last[controlled] == think_start))
    return rows[controlled][keep]


def top_logits(x: np.ndarray, need_top: bool) -> np.ndarray:
    """Each row's descending top-20 logits ([B, <=20]; [B, 0] unless `need_top`) by
    numpy's SIMD sort, for the kernel that computes log-sum-exp and -H itself (small V).
    All rows, in one call: selecting the thinking rows first would cost three more."""
    k = min(MAX_TOP_K, x.shape[1])
    if not need_top:
        return x[:, :0]
    return np.ascontiguousarray(np.sort(x, axis=1)[:, :-k - 1:-1])


def vocabulary_passes(logits, need_top: bool, need_entropy: bool, rows=None):
    """(descending top-20 logits [B, <=20], log-sum-exp [B], -H [B]) of CPU logits [B, V],
    vectorized: torch's SIMD exp, numpy's sort (small V) or torch's top-k (large V).
    Unneeded parts are empty or aliases. With `rows` ([N] int64) only those rows are
    computed; the other rows of the results are zeros."""
    import torch

    b = logits.shape[0]
    if rows is not None and rows.shape[0] < b:
        k = min(MAX_TOP_K, logits.shape[1])
        top = np.zeros((b, k if need_top else 0), np.float32)
        lse = np.zeros(b, np.float32)
        neg_ent = np.zeros(b, np.float32) if need_entropy else lse
        if rows.shape[0]:
            part = vocabulary_passes(logits.index_select(0, torch.from_numpy(rows)), need_top, need_entropy)
            top[rows], lse[rows] = part[0], part[1]
            if need_entropy:
                neg_ent[rows] = part[2]
        return top, lse, neg_ent
    lse_t = torch.logsumexp(logits, dim=-1)
    lse = lse_t.numpy()
    neg_ent = H.neg_entropy(logits, lse_t).numpy() if need_entropy else lse
    x = logits.numpy()
    if not need_top or x.shape[1] <= SORT_MAX_VOCAB:
        top = top_logits(x, need_top)
    else:
        top = torch.topk(logits, min(MAX_TOP_K, x.shape[1]), dim=-1).values.contiguous().numpy()
    return top, lse, neg_ent


def state_views(ctrl) -> tuple:
    """The controller's state tensors as numpy views (shared memory), kernel order."""
    w = ctrl.windows
    return tuple(t.numpy() for t in (
        ctrl.ints, ctrl.floats, ctrl.seqs, ctrl.suppress, ctrl.top_ids, ctrl.top_logprobs,
        w.window, w.signal, w.agg, w.n, w.v_cnt, w.v_sum, w.v_min, w.r_ring, w.v_ring, w.v_ok))


def warm_up(ctrl) -> None:
    """Compile (or load from numba's cache) the kernel for float32 logits now, at engine
    start, instead of at the first controlled request: one call on zero rows."""
    x = np.zeros((1, 2), np.float32)
    none = np.zeros(0, np.int64)
    for lse_here in (True, False):
        step_kernel(x, x[:, :0], np.zeros(0, np.float32), np.zeros(0, np.float32), lse_here, none, none,
                    none, none, 0, 0, *state_views(ctrl))
