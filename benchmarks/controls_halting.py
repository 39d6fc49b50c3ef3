"""Single-trace halting (action "conclude"): thinking tokens saved vs accuracy lost, through real vLLM.

    python benchmarks/controls_halting.py [--problems 200] [--cal-problems 100] [--verify 10]
                                          [--select-loss 0.5] [--conclusions step,none] [--model DIR]

Greedy decoding. Three phases on one engine:
1. Calibration slice (ttc_vllm.calibrate.CALIBRATION_SEED, disjoint from the evaluation seed):
   plain greedy traces with top-20 log-probs; per-token signals via `halting.replay_signal`.
2. Sweep (offline, the engine's maths): for every signal x aggregate x window x direction x
   min_tokens and a grid of tau (quantiles of the signal's values), each trace halts at the first
   thinking token where f_t crosses tau (`halting.aggregate_series` semantics). Accuracy is
   estimated with the calibration proxy (a halted trace is right iff the full trace was right and
   a step line had already stated the answer; `ttc_vllm.testbed.task.answer_known_at`). Per setting the
   tau saving most thinking within `--select-loss` points (and the one at no proxy loss) is kept;
   the `--verify` best settings (distinct halting behaviour) are then run for real (halting inside
   the engine) on the calibration slice with each `--conclusions` text, and the one saving the
   most thinking at a measured loss <= `--select-loss` points is chosen.
3. Evaluation slice (held-out seed): no halting vs the chosen setting, side by side in one
   `generate` call. Nothing is tuned on this slice.

Thinking tokens count the forced conclusion. Conclusions: "step" = "<step>\\n" (closes the current
step line, then `</think>`: the testbed's own format, so a halt in mid-line still yields an answer
line), "none" = a bare `</think>`, "default" = the options' default phrase (24 tokens here). Prints the sweep table and the results, writes
benchmarks/results/controls_halting.json and .png.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness

SIGNAL_OF = {"token_confidence": "token_confidence", "group_confidence": "token_confidence",
             "entropy": "entropy"}   # per-token r each halting signal is built from


def series(r: np.ndarray, signal: str, aggregate: str, window: int) -> np.ndarray:
    """f after each token (NaN where undefined): `halting.aggregate_series`, vectorized."""
    n = len(r)
    if n == 0:
        return np.zeros(0)
    if signal == "group_confidence":
        c = np.concatenate([[0.0], np.cumsum(r)])
        v = np.full(n, np.nan)
        if n >= window:
            v[window - 1:] = (c[window:] - c[:-window]) / window
    else:
        v = r.astype(float)
    ok = ~np.isnan(v)
    v0 = np.where(ok, v, 0.0)
    if aggregate == "mean":
        cnt = np.cumsum(ok)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(cnt > 0, np.cumsum(v0) / np.maximum(cnt, 1), np.nan)
    if aggregate == "min":
        m = np.minimum.accumulate(np.where(ok, v, np.inf))
        return np.where(np.isinf(m), np.nan, m)
    cs = np.concatenate([[0.0], np.cumsum(v0)])
    cn = np.concatenate([[0], np.cumsum(ok)])
    lo = np.maximum(np.arange(1, n + 1) - window, 0)
    s = cs[1:] - cs[lo]
    k = cn[1:] - cn[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, s / np.maximum(k, 1), np.nan)


def halt_points(f: np.ndarray, taus: np.ndarray, direction: str, min_tokens: int) -> np.ndarray:
    """Thinking tokens kept when halting under each tau (0 = never halts): the first i+1 >=
    min_tokens with f_i > tau ("above") or f_i < tau ("below")."""
    n = len(f)
    idx = np.arange(n)
    g = np.where((idx + 1 >= min_tokens) & ~np.isnan(f), f, -np.inf if direction == "above" else np.inf)
    if direction == "above":
        run = np.maximum.accumulate(g) if n else g
        pos = np.searchsorted(run, taus, side="right")          # first run > tau
    else:
        run = -np.minimum.accumulate(g) if n else g
        pos = np.searchsorted(run, -taus, side="right")         # first -run > -tau, i.e. run < tau
    return np.where(pos < n, pos + 1, 0)


def check_against_reference(traces) -> None:
    """The vectorized series must match the reference maths the engine mirrors."""
    from ttc_vllm.halting import aggregate_series

    for t in traces[:3]:
        for sig in ("token_confidence", "group_confidence", "entropy"):
            r = t["r"][SIGNAL_OF[sig]]
            for agg in ("mean", "min", "tail"):
                ref = np.array(aggregate_series(list(r), sig, agg, 8), dtype=float)
                got = series(r, sig, agg, 8)
                assert np.allclose(np.nan_to_num(ref, nan=-99), np.nan_to_num(got, nan=-99), atol=1e-6), (sig, agg)


CONCLUSIONS = {"step": "<step>\n", "none": None}


def halting_ttc(cfg: dict, conclusion: str) -> dict:
    ttc = {"halting": {"signal": cfg["signal"], "aggregate": cfg["aggregate"], "window": cfg["window"],
                       "direction": cfg["direction"], "min_tokens": cfg["min_tokens"],
                       "threshold": float(cfg["threshold"]), "action": "conclude"}}
    if conclusion != "default":
        ttc["conclusion"] = CONCLUSIONS[conclusion]
    return ttc


def run_traces(llm, problems, ttc: dict | None, max_tokens: int, logprobs: int | None = None):
    """Greedy traces of `problems` ([(tier, Problem)]) with one options dict (or None)."""
    from ttc_vllm.testbed.task import prompt

    kw = dict(temperature=0.0, max_tokens=max_tokens)
    if logprobs:
        kw["logprobs"] = logprobs
    return llm.generate([prompt(p) for _, p in problems], harness.params(ttc, **kw), use_tqdm=False)


def summarize(problems, outs, ids) -> dict:
    """Accuracy and thinking per tier and pooled for greedy outputs."""
    from ttc_vllm.testbed.task import extract_answer

    per: dict[str, dict] = {}
    for (tier, p), out in zip(problems, outs):
        o = out.outputs[0]
        tids = list(o.token_ids)
        d = per.setdefault(tier, dict(n=0, correct=0, think=0, tokens=0))
        d["n"] += 1
        d["correct"] += extract_answer(o.text) == p.answer
        d["think"] += harness.all_think_len(tids, ids)
        d["tokens"] += len(tids)
    per["all"] = {k: sum(d[k] for t, d in per.items()) for k in ("n", "correct", "think", "tokens")}
    return {t: dict(problems=d["n"], accuracy=d["correct"] / d["n"], mean_thinking=d["think"] / d["n"],
                    mean_tokens=d["tokens"] / d["n"], thinking_total=d["think"], correct=d["correct"])
            for t, d in per.items()}


def compare(base: dict, arm: dict) -> dict:
    out = {}
    for t in base:
        b, a = base[t], arm[t]
        out[t] = dict(accuracy_base=b["accuracy"], accuracy=a["accuracy"],
                      loss_points=100 * (b["accuracy"] - a["accuracy"]),
                      thinking_base=b["mean_thinking"], thinking=a["mean_thinking"],
                      thinking_saved=1 - a["thinking_total"] / b["thinking_total"] if b["thinking_total"] else 0.0,
                      tokens_base=b["mean_tokens"], tokens=a["mean_tokens"],
                      tokens_saved=1 - a["mean_tokens"] / b["mean_tokens"] if b["mean_tokens"] else 0.0)
    return out


def main() -> None:
    ap = harness.parser(__doc__)
    harness.add_engine_args(ap)
    ap.add_argument("--problems", type=int, default=200, help="evaluation problems per tier")
    ap.add_argument("--cal-problems", type=int, default=100, help="calibration problems per tier")
    ap.add_argument("--tiers", default=",".join(harness.TIERS))
    ap.add_argument("--signals", default="token_confidence,group_confidence,entropy")
    ap.add_argument("--aggregates", default="tail,mean,min")
    ap.add_argument("--windows", default="1,2,4,8,16,32,64")
    ap.add_argument("--directions", default="above,below")
    ap.add_argument("--min-tokens", default="0,8,16,32")
    ap.add_argument("--taus", type=int, default=80, help="tau grid size per setting (quantiles)")
    ap.add_argument("--verify", type=int, default=10, help="settings verified in the engine on the calibration slice")
    ap.add_argument("--select-loss", type=float, default=0.5,
                    help="accuracy loss (points) allowed on the calibration slice when choosing")
    ap.add_argument("--conclusions", default="step,none",
                    help="conclusion texts tried in verification: step, none, default (the first sizes the proxy)")
    ap.add_argument("--max-tokens", type=int, default=400)
    a = ap.parse_args()

    from ttc_vllm.calibrate import CALIBRATION_SEED
    from ttc_vllm.options import DEFAULT_CONCLUSION, HaltingOptions
    from ttc_vllm.testbed.evaluate import HELD_OUT_SEED
    from ttc_vllm.testbed.task import extract_answer, generate

    t0 = time.time()
    tiers = [t.strip() for t in a.tiers.split(",") if t.strip()]
    llm = harness.make_engine(a)
    ids = harness.Ids.of(llm)
    tok = llm.get_tokenizer()
    decode = lambda t: tok.decode(t, skip_special_tokens=False)  # noqa: E731
    conclusions = [c.strip() for c in a.conclusions.split(",") if c.strip()]
    for c in conclusions:
        if c not in (*CONCLUSIONS, "default"):
            raise SystemExit(f"--conclusions: unknown {c!r} (step, none, default)")
    texts = {**CONCLUSIONS, "default": DEFAULT_CONCLUSION}
    conc_lens = {c: len(tok.encode(texts[c], add_special_tokens=False)) if texts[c] else 0 for c in conclusions}
    conc_len = conc_lens[conclusions[0]]

    # 1. calibration traces
    cal = [(t, p) for t in tiers for p in generate(t, a.cal_problems, CALIBRATION_SEED)]
    outs = run_traces(llm, cal, None, a.max_tokens, logprobs=20)
    traces = []
    for (tier, p), out in zip(cal, outs):
        o = out.outputs[0]
        tids = list(o.token_ids)
        n_think = harness.first_think_len(tids, ids)
        traces.append(dict(
            tier=tier, n_think=n_think, correct=extract_answer(o.text) == p.answer,
            known=harness.answer_known_at(tids, ids, decode, p.answer),
            r={s: np.array(harness.thinking_signal(o.logprobs, n_think, s), dtype=float)
               for s in ("token_confidence", "entropy")}))
    check_against_reference(traces)
    base_correct = sum(t["correct"] for t in traces)
    base_think = sum(t["n_think"] for t in traces)
    n_cal = len(traces)
    print(f"calibration slice: {n_cal} traces, greedy accuracy {base_correct / n_cal:.1%}, "
          f"mean thinking {base_think / n_cal:.1f} ({time.time() - t0:.0f}s)", flush=True)

    # 2. offline sweep
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    strs = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    settings = []
    for sig in strs(a.signals):
        for agg in strs(a.aggregates):
            uses_window = sig == "group_confidence" or agg == "tail"
            for w in (ints(a.windows) if uses_window else [64]):
                for d in strs(a.directions):
                    for m in ints(a.min_tokens):
                        settings.append(dict(signal=sig, aggregate=agg, window=w, direction=d, min_tokens=m))
    qs = np.linspace(0.005, 0.995, a.taus)
    sweep = []
    for cfg in settings:
        fs = [series(t["r"][SIGNAL_OF[cfg["signal"]]], cfg["signal"], cfg["aggregate"], cfg["window"])
              for t in traces]
        vals = np.concatenate([f[~np.isnan(f)] for f in fs if len(f)]) if fs else np.zeros(0)
        if not len(vals):
            continue
        taus = np.unique(np.quantile(vals, qs))
        if cfg["signal"] != "entropy":
            taus = np.maximum(taus, 0.0)   # confidence thresholds are >= 0 (options validation)
        else:
            taus = np.minimum(taus, 0.0)
        correct = np.zeros(len(taus))
        think = np.zeros(len(taus))
        halted = np.zeros(len(taus))
        for t, f in zip(traces, fs):
            k = halt_points(f, taus, cfg["direction"], cfg["min_tokens"])
            h = k > 0
            # proxy: a halted trace keeps its answer iff it was right and already stated it
            halted_ok = (k >= t["known"]) if (t["correct"] and t["known"] is not None) else np.zeros(len(k), bool)
            correct += np.where(h, halted_ok, t["correct"])
            think += np.where(h, k + conc_len, t["n_think"])
            halted += h
        loss = 100 * (base_correct - correct) / n_cal
        saved = 1 - think / base_think
        for limit in sorted({a.select_loss, 0.0}):
            okm = loss <= limit + 1e-9
            if not okm.any():
                continue
            j = int(np.argmax(np.where(okm, saved, -np.inf)))
            sweep.append(dict(cfg, threshold=float(taus[j]), proxy_limit=limit, proxy_loss_points=float(loss[j]),
                              proxy_thinking_saved=float(saved[j]), proxy_halted_share=float(halted[j] / n_cal)))
    sweep.sort(key=lambda s: -s["proxy_thinking_saved"])
    print(f"\nsweep: {len(settings)} settings x {a.taus} taus on the calibration slice (proxy); best tau per setting "
          f"at proxy loss <= {a.select_loss} points, top 20:")
    print(sweep_table(sweep[:20]))

    # Verify the best settings for real on the calibration slice (one generate call for all).
    picked, seen = [], set()
    for s in sweep:
        if len(picked) >= a.verify:
            break
        key = (round(s["proxy_thinking_saved"], 6), round(s["proxy_loss_points"], 6), round(s["proxy_halted_share"], 6))
        if key in seen:   # same halting behaviour on every calibration trace as one already picked
            continue
        seen.add(key)
        HaltingOptions.model_validate(halting_ttc(s, "none")["halting"])  # clear error if invalid
        picked.append(s)
    cands = [dict(s, conclusion=c) for s in picked for c in conclusions]
    base_cal = summarize(cal, outs, ids)
    if cands:
        reqs = [(t, p) for _ in cands for (t, p) in cal]
        prm = [harness.params(halting_ttc(s, s["conclusion"]), temperature=0.0, max_tokens=a.max_tokens)
               for s in cands for _ in cal]
        from ttc_vllm.testbed.task import prompt
        vouts = llm.generate([prompt(p) for _, p in reqs], prm, use_tqdm=False)
        for i, s in enumerate(cands):
            arm = summarize(cal, vouts[i * n_cal:(i + 1) * n_cal], ids)
            c = compare(base_cal, arm)["all"]
            s.update(engine_loss_points=c["loss_points"], engine_thinking_saved=c["thinking_saved"])
    print(f"\nverified in the engine on the calibration slice ({time.time() - t0:.0f}s):")
    print(sweep_table(cands, engine=True))
    ok = [s for s in cands if s["engine_loss_points"] <= a.select_loss + 1e-9]
    chosen = max(ok, key=lambda s: s["engine_thinking_saved"]) if ok else None
    if chosen is None:
        print("no verified setting met the calibration loss limit; evaluating the least lossy one")
        chosen = min(cands, key=lambda s: (s["engine_loss_points"], -s["engine_thinking_saved"]))
    print(f"\nchosen on the calibration slice: {fmt_cfg(chosen)} tau={chosen['threshold']:.4g} "
          f"conclusion={chosen['conclusion']}")

    # 3. evaluation slice: no halting vs the chosen setting, side by side
    ev = [(t, p) for t in tiers for p in generate(t, a.problems, HELD_OUT_SEED)]
    from ttc_vllm.testbed.task import prompt
    prm = ([harness.params(None, temperature=0.0, max_tokens=a.max_tokens)] * len(ev)
           + [harness.params(halting_ttc(chosen, chosen["conclusion"]), temperature=0.0, max_tokens=a.max_tokens)]
           * len(ev))
    t1 = time.time()
    eouts = llm.generate([prompt(p) for _, p in ev] * 2, prm, use_tqdm=False)
    gen_s = time.time() - t1
    base_ev = summarize(ev, eouts[:len(ev)], ids)
    halt_ev = summarize(ev, eouts[len(ev):], ids)
    res = compare(base_ev, halt_ev)
    print(f"\nevaluation slice ({a.problems}/tier, held-out seed {HELD_OUT_SEED}), greedy:")
    print(harness.table(["tier", "acc base", "acc halt", "loss pts", "think base", "think halt", "think saved",
                    "tokens saved"],
                   [[t, harness.pct(r["accuracy_base"]), harness.pct(r["accuracy"]), f"{r['loss_points']:.1f}",
                     f"{r['thinking_base']:.1f}", f"{r['thinking']:.1f}", harness.pct(r["thinking_saved"]),
                     harness.pct(r["tokens_saved"])] for t, r in res.items()]))
    allr = res["all"]
    met = allr["loss_points"] <= 1.0 + 1e-9 and allr["thinking_saved"] >= 0.40
    print(f"\ntarget: >= 40% thinking saved at <= 1 point loss -> saved {allr['thinking_saved']:.1%}, "
          f"loss {allr['loss_points']:.1f} points: {'MET' if met else 'NOT MET'}")

    path = harness.write_result("controls_halting", {
        "model": harness.model_name(a), "decoding": "greedy", "max_tokens": a.max_tokens,
        "conclusions": {c: {"text": texts[c], "tokens": conc_lens[c]} for c in conclusions},
        "chosen_ttc": halting_ttc(chosen, chosen["conclusion"]),
        "calibration": {"seed": CALIBRATION_SEED, "problems_per_tier": a.cal_problems, "baseline": base_cal,
                        "select_loss_points": a.select_loss, "settings": len(settings), "taus_per_setting": a.taus,
                        "proxy": "halted trace right iff the full trace was right and a step line stated the "
                                 "answer by the halting point"},
        "sweep_top": sweep[:40], "verified": cands, "chosen": chosen,
        "evaluation": {"seed": HELD_OUT_SEED, "problems_per_tier": a.problems, "results": res,
                       "generate_seconds": round(gen_s, 1)},
        "target": {"thinking_saved_min": 0.40, "loss_points_max": 1.0, "met": met},
        "seconds": round(time.time() - t0, 1),
    })
    plot(sweep, cands, res, chosen, harness.RESULTS / "controls_halting.png")
    print(f"wrote {path} and {harness.RESULTS / 'controls_halting.png'}")
    harness.shutdown(llm)


def fmt_cfg(s: dict) -> str:
    return f"{s['signal']}/{s['aggregate']}/w{s['window']}/{s['direction']}/min{s['min_tokens']}"


def sweep_table(rows, engine: bool = False) -> str:
    head = (["setting", "tau", "halted", "proxy loss", "proxy saved"]
            + (["conclusion", "engine loss", "engine saved"] if engine else []))
    return harness.table(head, [[fmt_cfg(s), f"{s['threshold']:.4g}", harness.pct(s["proxy_halted_share"]),
                            f"{s['proxy_loss_points']:.1f}", harness.pct(s["proxy_thinking_saved"])]
                           + ([s["conclusion"], f"{s['engine_loss_points']:.1f}", harness.pct(s["engine_thinking_saved"])]
                              if engine else [])
                           for s in rows])


def plot(sweep, cands, res, chosen, path) -> None:
    plt = harness.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    sigs = sorted({s["signal"] for s in sweep})
    for i, sig in enumerate(sigs):
        xs = [100 * s["proxy_thinking_saved"] for s in sweep if s["signal"] == sig]
        ax1.scatter(range(len(xs)), sorted(xs, reverse=True), s=8, color=f"C{i}", label=f"{sig} (proxy)")
    ax1.set_xlabel("setting (ranked within signal)")
    ax1.set_ylabel("thinking saved on calibration (%)")
    ax1.set_title("sweep: best tau per setting at the loss limit")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    tiers = [t for t in res if t != "all"] + ["all"]
    x = np.arange(len(tiers))
    ax2.bar(x - 0.2, [100 * res[t]["thinking_saved"] for t in tiers], 0.4, label="thinking saved (%)")
    ax2.bar(x + 0.2, [res[t]["loss_points"] for t in tiers], 0.4, label="accuracy loss (points)")
    ax2.axhline(40, ls="--", color="gray", lw=0.8)
    ax2.set_xticks(x)
    ax2.set_xticklabels(tiers)
    ax2.set_title(f"evaluation: {fmt_cfg(chosen)} tau={chosen['threshold']:.3g}, conclusion {chosen['conclusion']}",
                  fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    ax2.legend(fontsize=7)
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
