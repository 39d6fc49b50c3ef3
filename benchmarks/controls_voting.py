"""Voting with in-engine "stop" halting of weak traces (DeepConf-online style) vs plain
majority@16, through real vLLM.

    python benchmarks/controls_voting.py [--problems 100] [--tiers medium,hard] [--cal-problems 40]
                                         [--budgets 112,128,160] [--select-loss 1.0] [--model DIR]

Sampling at temperature 0.8. Trace j of problem i always has seed base + 64*i + j, so a halted
trace is the prefix of the plain trace with the same seed (the processor edits no logits until
it forces EOS): the arms are paired, trace by trace.

1. Warm-up / calibration slice (ttc_vllm.calibrate.CALIBRATION_SEED): 16 plain traces per problem
   with top-20 log-probs. Two stop rules (--signals), each "stop a trace as soon as min f < tau":
   DeepConf's lowest group confidence (signal group_confidence over each --windows value), and
   the sampled token's margin (signal sampled_margin: stop at the first sampled token whose
   log-prob is more than |tau| below the top token's). For each rule and percentile, tau = that
   percentile of the warm-up traces' minimum (`calibrate.calibrate_entry`, direction "below"):
   DeepConf's offline threshold. The rule is applied to the same traces offline, stopped traces
   leave the vote, and each setting (rule, percentile, vote = majority or confidence-weighted,
   adaptive or not) gets its accuracy and tokens vs plain majority@16. "Adaptive" adds
   DeepConf's early exit: traces come in waves (--waves schedules, swept) and a problem stops
   sampling once >= --min-votes answers (swept) agree at a (weighted) share >= a --consensus value
   (swept). The adaptive exit without any halting is reported too, to separate the two.
   A thinking cap (`max_think`, each of --budgets, forced --conclusion) is the third control
   swept: the warm-up traces are sampled for real once per cap (same seeds), and the stop
   rules and exits are simulated on top of the capped traces (a stop fires only within the
   cap, before the forced conclusion). The setting with the fewest tokens at <= --select-loss
   points below majority@16 is chosen for each arm: stop alone, stop + adaptive exit (both
   uncapped, DeepConf-online), the cap alone, and cap + stop + adaptive exit.
2. Evaluation slice (held-out seed), all for real in one engine: 16 plain traces per problem
   (majority@16, and majority@k of the first k traces as the cheap baseline to beat), the
   chosen stop setting (16 traces, `HaltingOptions(action="stop", direction="below")`), the
   chosen adaptive settings run in waves (uncapped, and capped), the cap alone (16 traces),
   and the adaptive exit alone (with paired seeds exactly
   the first traces of the plain run, so read off it). Generated tokens count every token of every trace
   (stopped traces included); the warm-up slice is a one-off cost reported separately.

Prints tables, writes benchmarks/results/controls_voting.json and .png.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness
from benchmarks.controls_halting import halt_points, series

K = 16
SEED_STRIDE = 64


# Per-token series each trace keeps: token confidence (the group-confidence rule and DeepConf
# vote weights) and the sampled token's margin.
SERIES = ("token_confidence", "sampled_margin")


@dataclass
class Trace:
    answer: int | None
    tokens: int
    stopped: bool
    r: dict[str, np.ndarray] | None   # per-token series of the thinking block (None without log-probs)
    weights: dict = field(default_factory=dict, repr=False)   # weight_of's memo: (window, min_tokens) ->


@dataclass(frozen=True)
class Rule:
    """A stop rule: stop a trace once min f(v) < tau (`group_confidence` over `window`
    tokens, or the per-token `sampled_margin`, whose window is unused)."""

    signal: str
    window: int

    @property
    def series(self) -> str:
        return "token_confidence" if self.signal == "group_confidence" else self.signal

    @property
    def weight_window(self) -> int:
        return self.window if self.signal == "group_confidence" else 16


def seed_of(base: int, i: int, j: int) -> int:
    return base + SEED_STRIDE * i + j


def arm_ttc(rule: Rule | None, tau: float | None, min_tokens: int, budget: int | None = None,
            conclusion: str | None = None) -> dict | None:
    """The request's TTC options: the stop rule and/or the thinking cap (None: plain)."""
    ttc: dict = {}
    if budget is not None:
        ttc.update(max_think=int(budget), conclusion=conclusion)
    if rule is not None:
        ttc["halting"] = {"signal": rule.signal, "aggregate": "min", "window": rule.window,
                          "threshold": float(tau), "direction": "below", "action": "stop",
                          "min_tokens": min_tokens}
    return ttc or None


def sample(llm, ids, problems, jobs, base_seed: int, ttc: dict | None, temperature: float,
           max_tokens: int, logprobs: bool) -> dict[tuple[int, int], Trace]:
    """Traces (i, j) for jobs [(problem index, trace index)] in one generate call. With a
    thinking cap, the signal series stop at the cap: the forced conclusion after it is not
    the model's (and no halting acts on it)."""
    from ttc_vllm.testbed.task import extract_answer, prompt

    kw = dict(temperature=temperature, max_tokens=max_tokens)
    if logprobs:
        kw["logprobs"] = 20
    cap = (ttc or {}).get("max_think")
    reqs = [prompt(problems[i]) for i, _ in jobs]
    prm = [harness.params(ttc, seed=seed_of(base_seed, i, j), **kw) for i, j in jobs]
    outs = llm.generate(reqs, prm, use_tqdm=False)
    res = {}
    for (i, j), out in zip(jobs, outs):
        o = out.outputs[0]
        tids = list(o.token_ids)
        n_think = harness.first_think_len(tids, ids)
        natural = min(n_think, cap) if cap is not None else n_think
        # a stopped trace ends with the forced EOS inside its thinking: it has no answer
        stopped = ids.think_end not in tids and bool(tids) and tids[-1] == ids.eos
        r = ({name: np.array(harness.thinking_signal(o.logprobs, natural, name, token_ids=tids), float)
              for name in SERIES} if logprobs else None)
        res[(i, j)] = Trace(None if stopped else extract_answer(o.text), len(tids), stopped, r)
    return res


def min_group(r: np.ndarray, window: int, min_tokens: int) -> float:
    """Lowest group confidence where halting may act (NaN: trace shorter than a window)."""
    f = series(r, "group_confidence", "min", window)
    f = f[min_tokens - 1:] if min_tokens > 0 else f
    f = f[~np.isnan(f)]
    return float(f[-1]) if len(f) else float("nan")


def simulate_stop(t: Trace, rule: Rule, tau: float, min_tokens: int) -> Trace:
    """The trace the engine would produce with the stop rule (same seed): its prefix up to
    the first f under tau, plus the forced EOS."""
    f = series(t.r[rule.series], rule.signal, "min", rule.window)
    k = int(halt_points(f, np.array([tau]), "below", min_tokens)[0])
    if k > 0:
        return Trace(None, k + 1, True, {name: x[:k] for name, x in t.r.items()})
    return t


def vote(traces: list[Trace], weighted: bool, window: int, min_tokens: int):
    from ttc_vllm.search.aggregate import majority_vote, weighted_vote

    answers = [t.answer for t in traces]
    if not weighted:
        i = majority_vote(answers)
    else:
        ws = [weight_of(t, window, min_tokens) for t in traces]
        i = weighted_vote(answers, ws)
    return None if i is None else answers[i]


def weight_of(t: Trace, window: int, min_tokens: int) -> float:
    """DeepConf weighting: the trace's confidence (lowest group confidence; mean token
    confidence for traces shorter than a window)."""
    key = (window, min_tokens)
    if key not in t.weights:
        if t.r is None or not len(t.r["token_confidence"]):
            t.weights[key] = 1.0
        else:
            r = t.r["token_confidence"]
            s = min_group(r, window, min_tokens)
            t.weights[key] = s if s == s else float(np.mean(r))
    return t.weights[key]


def consensus(traces: list[Trace], weighted: bool, window: int, min_tokens: int, share: float,
              min_votes: int) -> bool:
    """search.adaptive's exit rule (`aggregate.leading_share`), with DeepConf weights when weighted."""
    from ttc_vllm.search.aggregate import leading_share

    answers = [t.answer for t in traces]
    weights = [weight_of(t, window, min_tokens) if weighted and t.answer is not None else 1.0 for t in traces]
    return leading_share(answers, weights, min_votes) >= share


def run_policy(per_problem: list[list[Trace]], answers: list[int], weighted: bool, window: int,
               min_tokens: int, waves: list[int] | None, share: float, min_votes: int) -> dict:
    """Accuracy / tokens of voting over given traces (in seed order), with the adaptive exit
    after each wave when `waves` is given."""
    correct = tokens = used = stopped = 0
    for traces, ans in zip(per_problem, answers):
        take = len(traces)
        if waves:
            take, acc = 0, 0
            for w in waves:
                acc += w
                take = min(acc, len(traces))
                if consensus(traces[:take], weighted, window, min_tokens, share, min_votes):
                    break
        ts = traces[:take]
        correct += vote(ts, weighted, window, min_tokens) == ans
        tokens += sum(t.tokens for t in ts)
        used += len(ts)
        stopped += sum(t.stopped for t in ts)
    n = len(answers)
    return dict(accuracy=correct / n, tokens=tokens / n, traces=used / n, stopped_share=stopped / max(used, 1))


ARMS = ("stop", "stop+adaptive", "cap", "cap+stop+adaptive")


def main() -> None:
    ap = harness.parser(__doc__)
    harness.add_engine_args(ap)
    ap.add_argument("--problems", type=int, default=100, help="evaluation problems per tier")
    ap.add_argument("--cal-problems", type=int, default=40, help="warm-up/calibration problems per tier")
    ap.add_argument("--tiers", default="medium,hard")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--signals", default="group_confidence,sampled_margin",
                    help="stop-rule signals swept (aggregate min, direction below, action stop)")
    ap.add_argument("--windows", default="4,8,16,32", help="group_confidence windows swept")
    ap.add_argument("--percentiles", default="5,10,25,50,75,90")
    ap.add_argument("--min-tokens", type=int, default=0)
    ap.add_argument("--waves", default="4,4,4,4;2,2,4,4,4",
                    help="wave schedules swept for the adaptive exit (traces per wave, each sums to 16; "
                         "';' between schedules)")
    ap.add_argument("--consensus", default="0.95,0.75,0.6",
                    help="answer shares that end sampling (adaptive), swept on the warm-up slice")
    ap.add_argument("--min-votes", default="2,3", help="answers needed before the adaptive exit (swept)")
    ap.add_argument("--budgets", default="112,128,160",
                    help="thinking caps (max_think) swept on the warm-up slice ('' for none)")
    ap.add_argument("--conclusion", default="<step>\n",
                    help="the conclusion forced at the cap (the testbed's step tag: controls_budget.py "
                         "shows it needs the smallest caps)")
    ap.add_argument("--select-loss", type=float, default=1.0,
                    help="accuracy loss (points) vs majority@16 allowed on the calibration slice")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--simulate", action="store_true",
                    help="also report what the offline simulation predicts on the evaluation slice "
                         "(needs log-probs of the 16 plain traces: slower)")
    a = ap.parse_args()

    from ttc_vllm.calibrate import CALIBRATION_SEED, calibrate_entry
    from ttc_vllm.options import TTCOptions
    from ttc_vllm.testbed.evaluate import HELD_OUT_SEED
    from ttc_vllm.testbed.task import generate

    t0 = time.time()
    tiers = [t.strip() for t in a.tiers.split(",") if t.strip()]
    schedules = [[int(x) for x in sched.split(",")] for sched in a.waves.split(";") if sched.strip()]
    if not schedules or any(sum(w) != K for w in schedules):
        raise SystemExit(f"every --waves schedule must sum to {K}")
    windows = [int(x) for x in a.windows.split(",")]
    min_votes = [int(x) for x in a.min_votes.split(",")]
    rules = [Rule(sig, w) for sig in a.signals.split(",")
             for w in (windows if sig == "group_confidence" else [1])]
    if any(r.signal not in ("group_confidence", "sampled_margin") for r in rules):
        raise SystemExit("--signals: group_confidence and/or sampled_margin")
    budgets = [int(x) for x in a.budgets.split(",") if x.strip()]
    shares = [float(x) for x in a.consensus.split(",")]
    exits = [(x, w, mv) for x in shares for w in schedules for mv in min_votes]
    percentiles = [float(x) for x in a.percentiles.split(",")]
    # Per-request seeds + chunked prefill crash vLLM 0.32 on CPU ("CPU Generator does not use
    # offset" when a partial prefill's sampled token is discarded): prefill whole prompts.
    llm = harness.make_engine(a, enable_chunked_prefill=False)
    ids = harness.Ids.of(llm)
    sargs = dict(temperature=a.temperature, max_tokens=a.max_tokens)

    def ttc_of(s: dict) -> dict | None:
        rule = Rule(s["signal"], s["window"]) if s["signal"] != "none" else None
        ttc = arm_ttc(rule, s["threshold"], a.min_tokens, s["budget"], a.conclusion)
        if ttc is not None:
            TTCOptions.model_validate(ttc)   # what the engine will be sent must be valid
        return ttc

    # 1. warm-up traces on the calibration slice (plain, then once per cap), offline sweep
    cal_probs = [p for t in tiers for p in generate(t, a.cal_problems, CALIBRATION_SEED)]
    cal_jobs = [(i, j) for i in range(len(cal_probs)) for j in range(K)]
    cal_ans = [p.answer for p in cal_probs]
    warmup_tokens = 0
    sweep = []
    base_cal = None
    for budget in [None] + budgets:
        cal = sample(llm, ids, cal_probs, cal_jobs, CALIBRATION_SEED,
                     arm_ttc(None, None, 0, budget, a.conclusion), logprobs=True, **sargs)
        cal_pp = [[cal[(i, j)] for j in range(K)] for i in range(len(cal_probs))]
        warmup_tokens += sum(t.tokens for t in cal.values())
        if budget is None:
            base_cal = run_policy(cal_pp, cal_ans, False, 16, 0, None, 1.0, 1)
            print(f"warm-up slice: {len(cal_probs)} problems x {K}: majority@16 {base_cal['accuracy']:.1%}, "
                  f"{base_cal['tokens']:.0f} tokens/problem ({time.time() - t0:.0f}s)", flush=True)

        def add(r: dict, **setting) -> None:
            sweep.append(dict(setting, budget=budget, accuracy=r["accuracy"], tokens=r["tokens"],
                              loss_points=100 * (base_cal["accuracy"] - r["accuracy"]),
                              tokens_saved=1 - r["tokens"] / base_cal["tokens"],
                              stopped_share=r["stopped_share"], traces=r["traces"]))

        # no stop rule: the plain (or capped) traces, majority vote, with or without the exit
        for share, sched, mv in [(None, None, None)] + exits:
            r = run_policy(cal_pp, cal_ans, False, 16, 0, sched, share or 1.0, mv or 1)
            add(r, signal="none", window=0, percentile=None, threshold=None, weighted=False,
                adaptive=share is not None, consensus=share, waves=sched, min_votes=mv)
        for rule in rules:
            for pc in percentiles:
                entry = calibrate_entry([list(t.r[rule.series]) for t in cal.values()], signal=rule.signal,
                                        aggregate="min", window=rule.window, direction="below",
                                        action="stop", min_tokens=a.min_tokens, percentile=pc)
                tau = entry["threshold"]
                sim = [[simulate_stop(t, rule, tau, a.min_tokens) for t in ts] for ts in cal_pp]
                for weighted in (False, True):
                    for share, sched, mv in [(None, None, None)] + exits:
                        r = run_policy(sim, cal_ans, weighted, rule.weight_window, a.min_tokens, sched,
                                       share or 1.0, mv or 1)
                        add(r, signal=rule.signal, window=rule.window, percentile=pc, threshold=tau,
                            weighted=weighted, adaptive=share is not None, consensus=share, waves=sched,
                            min_votes=mv)
        if budget is not None:
            cut = run_policy(cal_pp, cal_ans, False, 16, 0, None, 1.0, 1)
            print(f"  cap {budget}: majority@16 {cut['accuracy']:.1%}, {cut['tokens']:.0f} tokens/problem "
                  f"({time.time() - t0:.0f}s)", flush=True)
    print(f"\nwarm-up slice sweep ({len(sweep)} settings; stop rules applied offline to the paired traces), "
          "the 25 with the most tokens saved at <= --select-loss:")
    ok_all = [s for s in sweep if s["loss_points"] <= a.select_loss + 1e-9]
    print(sweep_table(sorted(ok_all, key=lambda s: -s["tokens_saved"])[:25]))
    # What each arm may use: stop rules uncapped (DeepConf), the cap alone, all three together.
    members = {
        "stop": lambda s: s["budget"] is None and s["signal"] != "none" and not s["adaptive"],
        "stop+adaptive": lambda s: s["budget"] is None and s["signal"] != "none" and s["adaptive"],
        "cap": lambda s: s["budget"] is not None and s["signal"] == "none" and not s["adaptive"],
        "cap+stop+adaptive": lambda s: s["budget"] is not None and s["signal"] != "none" and s["adaptive"],
        "adaptive only (no halting)": lambda s: s["budget"] is None and s["signal"] == "none" and s["adaptive"],
    }
    chosen = {}
    for arm, member in members.items():
        cands = [s for s in sweep if member(s)]
        if not cands:
            continue
        ok = [s for s in cands if s["loss_points"] <= a.select_loss + 1e-9]
        chosen[arm] = (max(ok, key=lambda s: s["tokens_saved"]) if ok
                       else min(cands, key=lambda s: (s["loss_points"], -s["tokens_saved"])))
        print(f"chosen ({arm}): {fmt(chosen[arm])}")

    # 2. evaluation slice, for real
    ev_probs = [(t, p) for t in tiers for p in generate(t, a.problems, HELD_OUT_SEED)]
    probs = [p for _, p in ev_probs]
    n = len(probs)
    seconds = {}
    t1 = time.time()
    base = sample(llm, ids, probs, [(i, j) for i in range(n) for j in range(K)], HELD_OUT_SEED, None,
                  logprobs=a.simulate, **sargs)
    seconds["majority@16"] = round(time.time() - t1, 1)
    runs: dict[str, dict[tuple[int, int], Trace]] = {}
    for arm in ("stop", "stop+adaptive", "cap", "cap+stop+adaptive"):
        if arm not in chosen:
            continue
        s = chosen[arm]
        ttc = ttc_of(s)
        t1 = time.time()
        if not s["adaptive"]:
            runs[arm] = sample(llm, ids, probs, [(i, j) for i in range(n) for j in range(K)], HELD_OUT_SEED,
                               ttc, logprobs=s["weighted"], **sargs)
        else:
            got: dict[tuple[int, int], Trace] = {}
            open_, done = list(range(n)), 0
            for w in s["waves"]:
                jobs = [(i, j) for i in open_ for j in range(done, done + w)]
                got.update(sample(llm, ids, probs, jobs, HELD_OUT_SEED, ttc, logprobs=s["weighted"], **sargs))
                done += w
                open_ = [i for i in open_ if not consensus(
                    [got[(i, j)] for j in range(done)], s["weighted"], weight_window(s), a.min_tokens,
                    s["consensus"], s["min_votes"])]
                if not open_:
                    break
            runs[arm] = got
        seconds[arm] = round(time.time() - t1, 1)

    rows = []
    for tier in tiers + ["all"]:
        idx = [i for i, (t, _) in enumerate(ev_probs) if tier in ("all", t)]
        ans = [probs[i].answer for i in idx]
        b_pp = [[base[(i, j)] for j in range(K)] for i in idx]
        for k in (1, 2, 4, 8, 16):
            r = run_policy([ts[:k] for ts in b_pp], ans, False, 16, 0, None, 1.0, 1)
            rows.append(dict(tier=tier, arm=f"majority@{k}", **r))
        for arm, got in runs.items():
            s = chosen[arm]
            pp = [[got[(i, j)] for j in range(K) if (i, j) in got] for i in idx]
            r = run_policy(pp, ans, s["weighted"], weight_window(s), a.min_tokens, None, 1.0, 1)
            rows.append(dict(tier=tier, arm=arm, **r))
        # the adaptive exit alone: with paired seeds, exactly the first traces of the plain run
        s = chosen["adaptive only (no halting)"]
        r = run_policy(b_pp, ans, False, 16, 0, s["waves"], s["consensus"], s["min_votes"])
        rows.append(dict(tier=tier, arm="adaptive only (no halting)", **r))
        # what the offline simulation predicts for the uncapped settings (fidelity check)
        for arm in (("stop", "stop+adaptive") if a.simulate else ()):
            s = chosen[arm]
            rule = Rule(s["signal"], s["window"])
            sim = [[simulate_stop(t, rule, s["threshold"], a.min_tokens) for t in ts] for ts in b_pp]
            r = run_policy(sim, ans, s["weighted"], rule.weight_window, a.min_tokens, s["waves"],
                           s["consensus"] or 1.0, s["min_votes"] or 1)
            rows.append(dict(tier=tier, arm=f"{arm} (simulated)", **r))
    base_by = {r["tier"]: r for r in rows if r["arm"] == "majority@16"}
    for r in rows:
        b = base_by[r["tier"]]
        r["loss_points"] = 100 * (b["accuracy"] - r["accuracy"])
        r["tokens_saved"] = 1 - r["tokens"] / b["tokens"]
    print(f"\nevaluation slice ({a.problems}/tier, seed {HELD_OUT_SEED}, T={a.temperature}); "
          "tokens = generated tokens per problem, all traces:")
    print(harness.table(["tier", "arm", "acc", "tokens", "saved", "loss pts", "traces", "stopped"],
                   [[r["tier"], r["arm"], harness.pct(r["accuracy"]), f"{r['tokens']:.0f}", harness.pct(r["tokens_saved"]),
                     f"{r['loss_points']:.1f}", f"{r['traces']:.1f}", harness.pct(r["stopped_share"])] for r in rows],
                   widths=[8, 28, 8, 9, 8, 10, 8, 9]))
    verdict = {}
    for arm in runs:
        r = next(x for x in rows if x["tier"] == "all" and x["arm"] == arm)
        met = r["loss_points"] <= 1.0 + 1e-9 and r["tokens_saved"] >= 0.60
        verdict[arm] = dict(tokens_saved=r["tokens_saved"], loss_points=r["loss_points"], met=met,
                            stop_halting="stop" in arm)
        print(f"target ({arm}): >= 60% fewer tokens at equal accuracy (<= 1 point below majority@16) -> "
              f"saved {r['tokens_saved']:.1%}, loss {r['loss_points']:.1f} points: {'MET' if met else 'NOT MET'}")
    print(f"warm-up cost: {warmup_tokens} tokens once ({warmup_tokens / n:.0f} per evaluation problem if "
          f"charged to this slice)")

    path = harness.write_result("controls_voting", {
        "model": harness.model_name(a), "temperature": a.temperature, "k": K, "tiers": tiers,
        "max_tokens": a.max_tokens, "halting": "signal swept / min / direction below / action stop",
        "signals": [r.signal for r in rules], "min_tokens": a.min_tokens, "waves_swept": schedules,
        "consensus_swept": shares, "min_votes_swept": min_votes, "budgets_swept": budgets,
        "conclusion": a.conclusion,
        "warmup": {"seed": CALIBRATION_SEED, "problems_per_tier": a.cal_problems, "traces_per_problem": K,
                   "tokens": warmup_tokens, "majority16": base_cal, "select_loss_points": a.select_loss},
        "sweep": sweep, "chosen": chosen,
        "chosen_ttc": {arm: ttc_of(s) for arm, s in chosen.items()},
        "evaluation": {"seed": HELD_OUT_SEED, "problems_per_tier": a.problems, "rows": rows,
                       "seconds": seconds},
        "target": {"tokens_saved_min": 0.60, "loss_points_max": 1.0, "verdict": verdict},
        "seconds": round(time.time() - t0, 1),
    })
    plot(rows, tiers, list(runs), harness.RESULTS / "controls_voting.png")
    print(f"wrote {path} and {harness.RESULTS / 'controls_voting.png'}")
    harness.shutdown(llm)


def weight_window(s: dict) -> int:
    return Rule(s["signal"], s["window"]).weight_window if s["signal"] != "none" else 16


def fmt(s: dict) -> str:
    how = (f"adaptive (consensus {s['consensus']:g}, waves {s['waves']}, min votes {s['min_votes']})"
           if s["adaptive"] else "all 16")
    cap = f"cap {s['budget']}, " if s["budget"] is not None else ""
    if s["signal"] == "none":
        rule = "no stop rule"
    else:
        win = f" window {s['window']}" if s["signal"] == "group_confidence" else ""
        rule = f"{s['signal']}{win}, percentile {s['percentile']:g} (tau {s['threshold']:.3f})"
    return (f"{cap}{rule}, {'weighted' if s['weighted'] else 'majority'} vote, {how}: "
            f"acc {s['accuracy']:.1%} (loss {s['loss_points']:.1f} pts), tokens saved {s['tokens_saved']:.1%}")


def sweep_table(sweep) -> str:
    none = lambda s: s["signal"] == "none"  # noqa: E731
    return harness.table(["cap", "signal", "window", "pct", "tau", "vote", "consensus", "waves", "acc", "loss pts",
                     "saved", "stopped", "traces"],
                    [[s["budget"] if s["budget"] is not None else "-", s["signal"],
                      "-" if none(s) else s["window"], "-" if none(s) else f"{s['percentile']:g}",
                      "-" if none(s) else f"{s['threshold']:.3f}",
                      "weighted" if s["weighted"] else "majority", f"{s['consensus']:g}" if s["adaptive"] else "-",
                      f"{','.join(map(str, s['waves']))} mv{s['min_votes']}" if s["waves"] else "-",
                      harness.pct(s["accuracy"]), f"{s['loss_points']:.1f}", harness.pct(s["tokens_saved"]),
                      harness.pct(s["stopped_share"]), f"{s['traces']:.1f}"] for s in sweep])


MARKERS = {"stop": ("s", "C0"), "stop+adaptive": ("D", "C1"), "adaptive only (no halting)": ("^", "C2"),
           "cap": ("v", "C4"), "cap+stop+adaptive": ("*", "C3")}


def plot(rows, tiers, arms, path) -> None:
    plt = harness.pyplot()
    fig, axes = plt.subplots(1, len(tiers) + 1, figsize=(4.2 * (len(tiers) + 1), 4))
    for ax, tier in zip(axes, tiers + ["all"]):
        rs = [r for r in rows if r["tier"] == tier]
        maj = [r for r in rs if r["arm"].startswith("majority@")]
        ax.plot([r["tokens"] for r in maj], [100 * r["accuracy"] for r in maj], "o-", color="gray",
                label="plain majority@k (k=1..16)")
        for name in list(arms) + ["adaptive only (no halting)"]:
            marker, color = MARKERS[name]
            r = next(x for x in rs if x["arm"] == name)
            ax.scatter([r["tokens"]], [100 * r["accuracy"]], marker=marker, s=70 if marker == "*" else 50,
                       color=color, zorder=5, label=f"{name} ({100 * r['tokens_saved']:.0f}% fewer tokens)")
        harness.style_accuracy_vs_tokens(ax, tier, legend_size=6.5)
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
