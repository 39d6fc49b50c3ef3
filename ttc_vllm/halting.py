"""Confidence signals, their aggregation and the halting rule (pure torch; no vLLM).

Per-token value r_t, computed from the logits the t-th thinking token was sampled from
(larger = more confident for every signal):

| signal             | r_t                                                  | range    |
|--------------------|------------------------------------------------------|----------|
| `token_confidence` | C_t = -mean of the top-k log-probs (DeepConf)        | >= 0     |
| `entropy`          | -H_t = sum_v p_v log p_v (minus the entropy)         | <= 0     |
| `group_confidence` | C_t, then v_t = G_t = mean of C over the last `window` tokens (only full windows count) | >= 0 |
| `sampled_margin`   | M_t = log p(sampled token) - log p(top token), the sampled token's log-prob clipped below at the 20th largest | <= 0 |

`sampled_margin` is 0 whenever the model's top choice was sampled and very negative when
sampling picked a token the model itself found unlikely -- the typical start of a slip
(a wrong digit). With `aggregate="min", direction="below", action="stop"` it ends a trace
at its first such token (benchmarks/controls_voting.py sweeps it beside group
confidence). Its value needs the token sampled from the logits, so the engine keeps each
slot's top-20 ids and log-probs for one step and scores the token when it arrives.

For `token_confidence`, `entropy` and `sampled_margin` the series is v_t = r_t. Aggregates f over the
valid v of the thinking so far:

| aggregate | f_t                                                                     |
|-----------|-------------------------------------------------------------------------|
| `mean`    | mean of every v so far (average trace confidence)                       |
| `min`     | minimum v so far (with `group_confidence`: lowest group confidence)     |
| `tail`    | mean of the v of the last `window` tokens (with `token_confidence`: the |
|           | current group confidence)                                               |

Rule (TS-DTP): halt iff f_t > tau (`direction="above"`); DeepConf's online stop of
low-confidence traces is f_t < tau (`direction="below"`). f is undefined (never halts)
until one valid value exists.

`SignalWindows` keeps the per-slot ring buffers on the logits' device and updates them
for a batch of slots with tensor ops only (no host sync). `aggregate_series` is the
plain-Python reference of the same maths for offline traces (calibration), and the
threshold helpers at the bottom pick tau from warm-up traces.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch

Signal = Literal["token_confidence", "group_confidence", "entropy", "sampled_margin"]
Aggregate = Literal["mean", "min", "tail"]
SIGNALS: tuple[str, ...] = get_args(Signal)       # codes: the position (signal_code)
AGGREGATES: tuple[str, ...] = get_args(Aggregate)
# The range of each signal's per-token value: "+" >= 0, "-" <= 0, and what it is.
SIGNAL_RANGES = {
    "token_confidence": ("+", "minus the mean of top-k log-probs"),
    "group_confidence": ("+", "minus the mean of top-k log-probs, averaged over a window"),
    "entropy": ("-", "minus the entropy, larger = more confident"),
    "sampled_margin": ("-", "log p(sampled) - log p(top)"),
}


def check_threshold_range(signal: str, threshold: float | str) -> None:
    """A threshold outside the signal's range could never (or would always) fire."""
    if isinstance(threshold, str):
        return
    sign, what = SIGNAL_RANGES.get(signal, (None, ""))
    if sign == "+" and threshold < 0:
        raise ValueError(f"{signal} is >= 0 ({what}); a negative threshold {threshold} makes no sense")
    if sign == "-" and threshold > 0:
        raise ValueError(f"{signal} is <= 0 ({what}); a positive threshold {threshold} makes no sense")


def clamp_threshold(signal: str, threshold: float) -> float:
    """`threshold` moved into the signal's range (the edge where it leaves it)."""
    sign = SIGNAL_RANGES.get(signal, (None, ""))[0]
    return max(threshold, 0.0) if sign == "+" else min(threshold, 0.0) if sign == "-" else threshold


SIGNAL_TOKEN, SIGNAL_GROUP, SIGNAL_ENTROPY, SIGNAL_SAMPLED = range(4)
AGG_MEAN, AGG_MIN, AGG_TAIL = range(3)
MAX_TOP_K = 20


def signal_code(name: str) -> int:
    return SIGNALS.index(name)


def aggregate_code(name: str) -> int:
    return AGGREGATES.index(name)


# ---- per-token signals on a batch of logits [B, V] --------------------------------------

@torch.library.custom_op("ttc_vllm::top_k", mutates_args=())
def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row, descending ([B, k] each). On
    CPU, numpy's introselect (partition, then sort only the k) takes ~1/3 of `torch.topk`'s
    time at batch 64: the largest single cost of a halting step there. An opaque op, so
    compiled steps keep one graph."""
    if x.device.type != "cpu":
        values, indices = x.topk(k, dim=-1)
        return values, indices
    a = x.detach().float().contiguous().numpy()   # numpy has no bfloat16
    cut = a.shape[1] - k
    idx = np.argpartition(a, cut, axis=1)[:, cut:]
    vals = np.take_along_axis(a, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    return torch.from_numpy(vals).to(x.dtype), torch.from_numpy(idx.astype(np.int64))


@topk_rows.register_fake
def _top_k_fake(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.long)


def top_values(x: torch.Tensor, k: int) -> torch.Tensor:
    return topk_rows(x, k)[0]


def sampled_margin(top_ids: torch.Tensor, top_logprobs: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """M = log p(token) - log p(top token) per row ([B]) from the row's top-k ids and
    log-probs ([B, k], descending): a token outside the top-k counts as the k-th
    log-prob (its true value is at most that)."""
    hit = torch.where(top_ids == token[:, None], top_logprobs, float("-inf")).amax(-1)
    return torch.maximum(hit, top_logprobs[:, -1]) - top_logprobs[:, 0]


def token_confidence(logits: torch.Tensor, top_k: int | torch.Tensor = MAX_TOP_K,
                     lse: torch.Tensor | None = None) -> torch.Tensor:
    """C = -mean of the top-k log-probs of each row ([B]); k may differ per row ([B] tensor).
    Masked tokens (-inf) are left out of the mean, so a row with fewer than k allowed tokens
    averages the allowed ones. Top-k log-probs are the top-k logits minus logsumexp: no
    [B, V] log-softmax is materialised."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1) if lse is None else lse
    k_max = min(MAX_TOP_K if isinstance(top_k, torch.Tensor) else top_k, x.shape[-1])
    top = top_values(x, k_max) - lse[:, None]                    # [B, k_max], descending
    return confidence_from_top(top, top_k)


def confidence_from_top(top_logprobs: torch.Tensor, top_k: int | torch.Tensor) -> torch.Tensor:
    """Token confidence from each row's descending top log-probs [B, k_max]: minus the mean
    of the first k finite ones."""
    b, k_max = top_logprobs.shape
    ks = (top_k.to(top_logprobs.device) if isinstance(top_k, torch.Tensor)
          else torch.full((b,), k_max, device=top_logprobs.device))
    take = torch.arange(k_max, device=top_logprobs.device)[None, :] < ks[:, None]
    take &= torch.isfinite(top_logprobs)
    total = torch.where(take, top_logprobs, torch.zeros_like(top_logprobs)).sum(-1)
    return -total / take.sum(-1).clamp(min=1)


def neg_entropy(logits: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """-H = sum p log p of each row ([B], <= 0; 0 for a one-hot distribution)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1) if lse is None else lse
    p = torch.exp(x - lse[:, None])
    # sum p (x - lse) = sum p x - lse; masked tokens (p = 0, x = -inf) contribute 0
    return (p * torch.where(p > 0, x, torch.zeros_like(x))).sum(-1) - lse


def raw_signal(logits: torch.Tensor, signal: torch.Tensor, top_k: torch.Tensor,
               need_confidence: bool = True, need_entropy: bool = True, need_top: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(r_t per row for per-row signal codes ([B]): -H for entropy rows, C for confidence
    rows, 0 for sampled-margin rows (scored at the next step); and with `need_top` the
    rows' top-20 ids and log-probs, which that next step needs). The need_* flags
    (host-known) skip work no row uses."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    zero = torch.zeros_like(lse)
    conf, top_ids, top_lp = zero, None, None
    if need_confidence or need_top:
        values, ids = topk_rows(x, min(MAX_TOP_K, x.shape[-1]))
        lp = values - lse[:, None]
        if need_confidence:
            conf = confidence_from_top(lp, top_k)
        if need_top:
            top_ids, top_lp = ids, lp
    ent = neg_entropy(x, lse) if need_entropy else zero
    raw = torch.where(signal == SIGNAL_ENTROPY, ent, torch.where(signal == SIGNAL_SAMPLED, zero, conf))
    return raw, top_ids, top_lp


def halt_decision(f: torch.Tensor, valid: torch.Tensor, tau: torch.Tensor,
                  above: torch.Tensor) -> torch.Tensor:
    """The rule: valid & (f > tau if above else f < tau), elementwise."""
    return valid & torch.where(above, f > tau, f < tau)


# ---- per-slot ring buffers on device ----------------------------------------------------

def write_row(tensor: torch.Tensor, index, values) -> None:
    """An admission-time write of host values (a number or an array) into a state tensor:
    through a numpy view on CPU (a torch setitem costs ~5 us of dispatch, and admission
    does a dozen), else one host->device copy."""
    if tensor.device.type == "cpu":
        tensor.numpy()[index] = values
    elif isinstance(values, np.ndarray):
        tensor[index] = torch.from_numpy(values).to(tensor.device)
    else:
        tensor[index] = values


class SignalWindows:
    """Ring buffers [slots, W] of r and v per request slot, plus running mean/min of v.

    `reset` runs at admission (host writes), `push`/`value` every step on a batch of slot
    indices with tensor ops only. Rows whose `mask` is False leave their slot untouched.
    """

    def __init__(self, num_slots: int, window: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.num_slots = num_slots
        self.capacity = 0
        self.window = torch.ones(num_slots, dtype=torch.long, device=self.device)
        self.signal = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.agg = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.n = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.v_cnt = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.v_sum = torch.zeros(num_slots, dtype=torch.float32, device=self.device)
        self.v_min = torch.full((num_slots,), math.inf, dtype=torch.float32, device=self.device)
        self.r_ring = torch.zeros(num_slots, 0, dtype=torch.float32, device=self.device)
        self.v_ring = torch.zeros(num_slots, 0, dtype=torch.float32, device=self.device)
        self.v_ok = torch.zeros(num_slots, 0, dtype=torch.bool, device=self.device)
        self.ensure_capacity(window)

    def ensure_capacity(self, window: int) -> None:
        """Grow the rings to hold `window` columns (admission time only)."""
        if window <= self.capacity:
            return
        grow = window - self.capacity
        pad = lambda t: torch.cat([t, t.new_zeros(self.num_slots, grow)], dim=1)  # noqa: E731
        self.r_ring, self.v_ring, self.v_ok = pad(self.r_ring), pad(self.v_ring), pad(self.v_ok)
        self.capacity = window

    def reset(self, slot: int, signal: int, aggregate: int, window: int) -> None:
        self.ensure_capacity(window)
        for tensor, value in ((self.window, window), (self.signal, signal), (self.agg, aggregate),
                              (self.n, 0), (self.v_cnt, 0), (self.v_sum, 0.0),
                              (self.v_min, math.inf), (self.v_ok, False)):
            write_row(tensor, slot, value)

    def push(self, slots: torch.Tensor, r: torch.Tensor, mask: torch.Tensor) -> None:
        """Append r to the slots where mask holds ([R] each; a slot appears at most once
        among masked rows)."""
        w = self.window[slots]
        n0 = self.n[slots]
        idx = n0 % w
        r_old = self.r_ring[slots, idx]
        self.r_ring[slots, idx] = torch.where(mask, r.float(), r_old)
        n1 = n0 + mask.long()
        filled = torch.minimum(n1, w)
        cols = torch.arange(self.r_ring.shape[1], device=self.device)[None, :] < filled[:, None]
        group = (self.r_ring[slots] * cols).sum(-1) / filled.clamp(min=1)
        is_group = self.signal[slots] == SIGNAL_GROUP
        v = torch.where(is_group, group, r.float())
        ok = mask & (~is_group | (n1 >= w))
        self.v_ring[slots, idx] = torch.where(mask, v, self.v_ring[slots, idx])
        self.v_ok[slots, idx] = torch.where(mask, ok, self.v_ok[slots, idx])
        self.v_sum[slots] = self.v_sum[slots] + torch.where(ok, v, torch.zeros_like(v))
        self.v_cnt[slots] = self.v_cnt[slots] + ok.long()
        self.v_min[slots] = torch.where(ok, torch.minimum(self.v_min[slots], v), self.v_min[slots])
        self.n[slots] = n1

    def value(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, valid) per row for each slot's aggregate."""
        cnt = self.v_cnt[slots]
        mean = self.v_sum[slots] / cnt.clamp(min=1)
        filled = torch.minimum(self.n[slots], self.window[slots])
        cols = torch.arange(self.r_ring.shape[1], device=self.device)[None, :] < filled[:, None]
        take = cols & self.v_ok[slots]
        tail_n = take.sum(-1)
        tail = torch.where(take, self.v_ring[slots], torch.zeros((), device=self.device)).sum(-1)
        tail = tail / tail_n.clamp(min=1)
        agg = self.agg[slots]
        f = torch.where(agg == AGG_MIN, self.v_min[slots], torch.where(agg == AGG_TAIL, tail, mean))
        return f, cnt > 0


# ---- plain-Python reference for offline traces ------------------------------------------

def replay_signal(position_logprobs: Sequence[dict] | None, signal: str, top_k: int = MAX_TOP_K,
                  token_ids: Sequence[int] | None = None) -> list[float]:
    """The per-token values r_t of `signal`, replayed on the host from the log-probs vLLM
    returned for each generated position ({token_id: Logprob or float}: the top-k plus the
    sampled token when it is outside them) -- the maths `raw_signal` does in the engine,
    for calibration, the benchmarks' offline replays and search truncation:

    token / group confidence: -mean of the `top_k` largest log-probs; entropy: sum p log p
    over the returned tokens (exact when the whole vocabulary was returned); sampled_margin
    (needs the sampled `token_ids`): its log-prob, clipped below at the 20th largest as in
    the engine, minus the largest."""
    if position_logprobs is None:
        return []
    if signal not in SIGNALS:
        raise ValueError(f"unknown signal {signal!r}; choose from {', '.join(SIGNALS)}")
    if signal == "sampled_margin" and token_ids is None:
        raise ValueError("sampled_margin needs the sampled token ids")
    out = []
    for t, pos in enumerate(position_logprobs):
        values = {tok: float(getattr(v, "logprob", v)) for tok, v in pos.items()}
        ranked = sorted(values.values(), reverse=True)
        if signal == "sampled_margin":
            floor = ranked[MAX_TOP_K - 1] if len(ranked) >= MAX_TOP_K else -math.inf
            out.append(max(values[token_ids[t]], floor) - ranked[0])
        elif signal == "entropy":
            out.append(sum(math.exp(v) * v for v in ranked if v > -math.inf))
        else:
            top = [v for v in ranked[:top_k] if v > -math.inf]
            out.append(-sum(top) / max(len(top), 1))
    return out


def aggregate_series(r: Sequence[float], signal: str, aggregate: str, window: int) -> list[float]:
    """f after each token of a trace of per-token values r (NaN where undefined): the same
    maths as `SignalWindows`, written out plainly for calibration and tests."""
    if signal not in SIGNALS or aggregate not in AGGREGATES or window < 1:
        raise ValueError(f"bad signal/aggregate/window: {signal!r}, {aggregate!r}, {window!r}")
    vs: list[float | None] = []
    out: list[float] = []
    for t in range(len(r)):
        if signal == "group_confidence":
            v = sum(r[t - window + 1:t + 1]) / window if t + 1 >= window else None
        else:
            v = float(r[t])
        vs.append(v)
        valid = [x for x in vs if x is not None]
        if not valid:
            out.append(math.nan)
        elif aggregate == "mean":
            out.append(sum(valid) / len(valid))
        elif aggregate == "min":
            out.append(min(valid))
        else:
            tail = [x for x in vs[-window:] if x is not None]
            out.append(sum(tail) / len(tail))
    return out


def trace_score(f: Sequence[float], min_tokens: int = 0, direction: str = "above") -> float:
    """The extreme f a trace reaches where halting may fire (after >= min_tokens thinking
    tokens; f[i] is the value after i+1 tokens): the trace would halt under tau iff
    score > tau ("above") or score < tau ("below"). NaN if it never becomes eligible."""
    eligible = [x for i, x in enumerate(f) if i + 1 >= min_tokens and not math.isnan(x)]
    if not eligible:
        return math.nan
    return max(eligible) if direction == "above" else min(eligible)


# ---- threshold calibration (pure) -------------------------------------------------------

def threshold_by_percentile(scores: Sequence[float], percentile: float) -> float:
    """tau below which `percentile`% of the (non-NaN) warm-up trace scores lie, linearly
    interpolated (numpy's default). DeepConf keeping the top 90% of traces: direction
    "below", percentile 10. Halting the most confident 20% ("above"): percentile 80."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    xs = sorted(x for x in scores if not math.isnan(x))
    if not xs:
        raise ValueError("no warm-up trace reached the halting window; cannot calibrate")
    pos = (len(xs) - 1) * percentile / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def threshold_by_accuracy_loss(scores: Sequence[float], correct: Sequence[bool], max_loss: float,
                               direction: str = "above") -> float:
    """The tau acting on the most traces whose accuracy cost is at most `max_loss`
    (fraction of all traces).

    "above" (conclude early when confident): a trace acted on is one with score > tau; it
    costs accuracy if it is wrong (`correct` should be the outcome when halted there).
    "below" (stop unconfident traces): acted on iff score < tau; a stopped correct trace is
    lost. Traces with NaN score are never acted on.
    """
    if len(scores) != len(correct) or not scores:
        raise ValueError("scores and correct must be non-empty and of equal length")
    if not 0 <= max_loss <= 1:
        raise ValueError(f"max_loss must be in [0, 1], got {max_loss}")
    if direction not in ("above", "below"):
        raise ValueError(f"direction must be 'above' or 'below', got {direction!r}")
    pairs = [(s, bool(c)) for s, c in zip(scores, correct) if not math.isnan(s)]
    if not pairs:
        raise ValueError("no warm-up trace reached the halting window; cannot calibrate")
    n = len(scores)
    uniq = sorted({s for s, _ in pairs})
    if direction == "above":
        candidates = [math.nextafter(uniq[0], -math.inf)] + uniq
        acted = lambda tau: [(s, c) for s, c in pairs if s > tau]  # noqa: E731
        cost = lambda group: sum(not c for _, c in group)  # noqa: E731
    else:
        candidates = uniq + [math.nextafter(uniq[-1], math.inf)]
        acted = lambda tau: [(s, c) for s, c in pairs if s < tau]  # noqa: E731
        cost = lambda group: sum(c for _, c in group)  # noqa: E731
    best: tuple[int, float] | None = None
    for tau in candidates:
        group = acted(tau)
        if cost(group) / n <= max_loss + 1e-12 and (best is None or len(group) > best[0]):
            best = (len(group), tau)
    assert best is not None  # acting on no trace always costs nothing
    return best[1]
