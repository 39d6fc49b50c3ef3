"""Accuracy versus thinking budget (`max_think`) per testbed tier, through real vLLM.

    python benchmarks/controls_budget.py [--problems 100] [--budgets 0,8,16,32,48,64,96,112,128,160,192,224,256,none]
                                         [--conclusions none,step,default] [--model DIR]

Greedy decoding on the held-out evaluation slice. Every (budget, conclusion) arm runs in one
`generate` call on one engine, so the arms are measured side by side. "none" is a plain request
(no TTC options): the uncapped policy. Conclusions (the `conclusion` option, forced before
`</think>` when the budget is hit; it counts as thinking): "none" = a bare `</think>`;
"step" = "<step>\\n", which closes the current step line first, the testbed's own format (a cut
in mid-line otherwise leaves the model out of distribution); "default" = the options' default
phrase ("\\nTime is up, concluding.", 24 tokens with the testbed's byte-level tokenizer), which
leaves less free thinking under the same cap.

Per cell: accuracy, mean thinking tokens (all thinking blocks), share of traces the cap cut
(ended by the forced `</think>`), and the number of requests whose thinking exceeded their
cap (must be 0). Prints tables, writes benchmarks/results/controls_budget.json and .png.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness

# Conclusion modes: the text forced before `</think>` (None: nothing); "default" is the options' default.
CONCLUSIONS: dict[str, str | None] = {"none": None, "step": "<step>\n", "default": None}


def parse_budgets(text: str) -> list[int | None]:
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(None if part in ("none", "inf", "") else int(part))
    return out


def budget_label(b: int | None) -> str:
    return "none" if b is None else str(b)


def main() -> None:
    ap = harness.parser(__doc__)
    harness.add_engine_args(ap)
    ap.add_argument("--problems", type=int, default=100, help="problems per tier")
    ap.add_argument("--tiers", default=",".join(harness.TIERS))
    ap.add_argument("--budgets", default="0,8,16,32,48,64,96,112,128,160,192,224,256,none")
    ap.add_argument("--conclusions", default="none,step,default",
                    help="comma list of conclusion modes: none (bare </think>), step (<step>\\n), default (the phrase)")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--seed", type=int, default=None, help="problem seed (default: the held-out evaluation seed)")
    a = ap.parse_args()

    from ttc_vllm.options import DEFAULT_CONCLUSION
    from ttc_vllm.testbed.evaluate import HELD_OUT_SEED
    from ttc_vllm.testbed.task import extract_answer, generate, prompt

    seed = HELD_OUT_SEED if a.seed is None else a.seed
    tiers = [t.strip() for t in a.tiers.split(",") if t.strip()]
    budgets = parse_budgets(a.budgets)
    modes = [m.strip() for m in a.conclusions.split(",") if m.strip()]
    for m in modes:
        if m not in CONCLUSIONS:
            raise SystemExit(f"--conclusions: unknown mode {m!r} ({', '.join(CONCLUSIONS)})")
    t0 = time.time()
    llm = harness.make_engine(a)
    ids = harness.Ids.of(llm)
    tok = llm.get_tokenizer()
    conc_text = {**CONCLUSIONS, "default": DEFAULT_CONCLUSION}
    conc_len = {m: len(tok.encode(t, add_special_tokens=False)) if t else 0 for m, t in conc_text.items()}

    # One request per (tier, problem, arm); the uncapped arm is shared by both modes.
    arms: list[tuple[str, int | None]] = [("uncapped", None)]
    arms += [(m, b) for m in modes for b in budgets if b is not None]
    reqs, meta = [], []
    for tier in tiers:
        for p in generate(tier, a.problems, seed):
            for mode, b in arms:
                ttc = None
                if b is not None:
                    ttc = {"max_think": b}
                    if mode != "default":
                        ttc["conclusion"] = conc_text[mode]
                reqs.append(prompt(p))
                meta.append((tier, p, mode, b, harness.params(ttc, temperature=0.0, max_tokens=a.max_tokens)))
    print(f"{len(reqs)} greedy requests ({len(tiers)} tiers x {a.problems} problems x {len(arms)} arms)", flush=True)
    t1 = time.time()
    outs = llm.generate(reqs, [m[4] for m in meta], use_tqdm=False)
    gen_s = time.time() - t1

    cells: dict[tuple[str, str, str], dict] = {}
    for (tier, p, mode, b, _), out in zip(meta, outs):
        o = out.outputs[0]
        tids = list(o.token_ids)
        think = harness.all_think_len(tids, ids)
        first = harness.first_think_len(tids, ids)
        c = cells.setdefault((mode, budget_label(b), tier), dict(n=0, correct=0, think=0, tokens=0, cut=0,
                                                                 over=0, no_answer=0))
        c["n"] += 1
        ans = extract_answer(o.text)
        c["correct"] += ans == p.answer
        c["no_answer"] += ans is None
        c["think"] += think
        c["tokens"] += len(tids)
        if b is not None:
            c["over"] += think > b
            # The forced ending: the first thinking block reached the point where forcing starts.
            start = b - conc_len[mode] if b >= conc_len[mode] else 0
            c["cut"] += ids.think_end in tids and first >= start
    rows = []
    for (mode, b, tier), c in cells.items():
        n = c["n"]
        rows.append(dict(conclusion=mode, budget=b, tier=tier, problems=n, accuracy=c["correct"] / n,
                         mean_thinking_tokens=c["think"] / n, mean_generated_tokens=c["tokens"] / n,
                         cut_share=c["cut"] / n, no_answer=c["no_answer"], over_cap=c["over"]))
    over_total = sum(r["over_cap"] for r in rows)
    capped_requests = sum(r["problems"] for r in rows if r["budget"] != "none")

    # Summaries: per mode and tier, the smallest budget within 1 point of uncapped accuracy.
    by = {(r["conclusion"], r["budget"], r["tier"]): r for r in rows}
    summary = []
    for mode in modes:
        for tier in tiers:
            base = by[("uncapped", "none", tier)]
            hit = next((b for b in budgets if b is not None
                        and by[(mode, str(b), tier)]["accuracy"] >= base["accuracy"] - 0.01), None)
            rb = by[(mode, str(hit), tier)] if hit is not None else None
            summary.append(dict(conclusion=mode, tier=tier, uncapped_accuracy=base["accuracy"],
                                uncapped_thinking=base["mean_thinking_tokens"], flat_budget=hit,
                                accuracy_at_flat=rb["accuracy"] if rb else None,
                                thinking_at_flat=rb["mean_thinking_tokens"] if rb else None,
                                thinking_saved_at_flat=(1 - rb["mean_thinking_tokens"] / base["mean_thinking_tokens"])
                                if rb and base["mean_thinking_tokens"] else None))

    for mode in modes:
        print(f"\nconclusion = {mode} ({conc_text[mode]!r}, {conc_len[mode]} tokens); "
              "accuracy % / mean thinking tokens / % of traces cut by the cap")
        head = ["max_think"] + [f"{t} acc" for t in tiers] + [f"{t} think" for t in tiers] + [f"{t} cut" for t in tiers] + ["over cap"]
        trs = []
        for b in budgets:
            key = (mode, budget_label(b)) if b is not None else ("uncapped", "none")
            rs = [by[(*key, t)] for t in tiers]
            trs.append([budget_label(b)] + [harness.pct(r["accuracy"]) for r in rs]
                       + [f"{r['mean_thinking_tokens']:.1f}" for r in rs]
                       + [harness.pct(r["cut_share"]) for r in rs] + [sum(r["over_cap"] for r in rs)])
        print(harness.table(head, trs))
    print("\nsmallest budget within 1 point of uncapped accuracy:")
    print(harness.table(["conclusion", "tier", "uncapped acc", "uncapped think", "budget", "acc", "think", "saved"],
                   [[s["conclusion"], s["tier"], harness.pct(s["uncapped_accuracy"]), f"{s['uncapped_thinking']:.1f}",
                     s["flat_budget"], harness.pct(s["accuracy_at_flat"]) if s["accuracy_at_flat"] is not None else "-",
                     f"{s['thinking_at_flat']:.1f}" if s["thinking_at_flat"] is not None else "-",
                     harness.pct(s["thinking_saved_at_flat"]) if s["thinking_saved_at_flat"] is not None else "-"]
                    for s in summary]))
    print(f"\nrequests over their thinking cap: {over_total} of {capped_requests} capped requests")
    print(f"generation {gen_s:.1f}s for {len(reqs)} requests")

    path = harness.write_result("controls_budget", {
        "model": harness.model_name(a), "problems_per_tier": a.problems, "seed": seed, "decoding": "greedy",
        "max_tokens": a.max_tokens, "budgets": [budget_label(b) for b in budgets], "conclusions": modes,
        "conclusion_tokens": {m: conc_len[m] for m in modes}, "cells": rows, "summary": summary,
        "requests_over_cap": over_total, "capped_requests": capped_requests,
        "generate_seconds": round(gen_s, 1), "seconds": round(time.time() - t0, 1),
    })
    plot(rows, tiers, budgets, modes, harness.RESULTS / "controls_budget.png", a.problems)
    print(f"wrote {path} and {harness.RESULTS / 'controls_budget.png'}")
    harness.shutdown(llm)


def plot(rows, tiers, budgets, modes, path, problems) -> None:
    plt = harness.pyplot()
    by = {(r["conclusion"], r["budget"], r["tier"]): r for r in rows}
    finite = [b for b in budgets if b is not None]
    x_none = (max(finite) * 1.5) if finite else 1
    xs = [b if b is not None else x_none for b in budgets]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"none": ":", "step": "-", "default": "--"}
    for i, tier in enumerate(tiers):
        color = f"C{i}"
        for mode in modes:
            rs = [by[(mode, str(b), tier)] if b is not None else by[("uncapped", "none", tier)] for b in budgets]
            ax1.plot(xs, [100 * r["accuracy"] for r in rs], styles[mode], marker="o", ms=3, color=color,
                     label=f"{tier}, conclusion={mode}")
            ax2.plot(xs, [r["mean_thinking_tokens"] for r in rs], styles[mode], marker="o", ms=3, color=color,
                     label=f"{tier}, conclusion={mode}")
    for ax in (ax1, ax2):
        ax.set_xscale("function", functions=(np.sqrt, np.square))   # spreads the small budgets
        ax.set_xticks(xs)
        ax.set_xticklabels([budget_label(b) for b in budgets], fontsize=7)
        ax.set_xlabel("max_think (thinking-token budget)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("greedy accuracy (%)")
    ax1.set_ylim(0, 100)
    ax2.set_ylabel("mean thinking tokens")
    ax1.set_title(f"accuracy vs budget ({problems}/tier)")
    ax2.set_title("thinking tokens actually used")
    ax2.legend(fontsize=7, loc="upper left")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
