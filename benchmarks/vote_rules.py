"""Decision rules compared on the very same traces: majority vs PRM-weighted vote vs best-of-N,
for every step-score aggregation, at k = 1..n samples per problem.

    python benchmarks/vote_rules.py [--tiers hard] [--problems 320] [--n 16] [--prm-config JSON]
        [--out runs/bench/vote_rules] [--result-name vote_rules] [--summarize-only] [--from-index K]
        [--controls JSON] [--ks 1,2,4,6,8,16] [--baseline DIR]

One `ttc-vllm job evaluate` run on a local Ray head (loopback; one policy replica, one PRM
actor, real vLLM engines) samples n full traces per problem at temperature 0.8 and scores all
of them with the PRM (strategy weighted_vote); each record keeps every candidate's answer
and step scores (resumable: rerun with the same --out). Then, offline, for k in 1, 2, 4, ..
n (the first k candidates: still k independent samples) each rule decides: majority,
weighted vote and best-of-N under each aggregation (min, prod, mean, last), and pass@k
(any candidate right) as the ceiling. Because every rule sees the same samples, the
difference between two rules has no sampling noise of its own: per problem it is +1, 0 or
-1, and the table reports the paired difference at k = n with a 95 % bootstrap interval
over problems (and the win / loss counts). Generated tokens are the same for every rule at
a given k. Prints a table, writes benchmarks/results/<result-name>.json and .png.

`--controls` gives every sampled trace in-engine thinking controls (`job evaluate
--controls`: a budget, or a halting rule that concludes the trace early). `--baseline DIR`
names another run of this script (the same problems, plain traces) whose best-of-n (`min`)
is the reference of the search issue's compute target: the table then adds, per rule and k,
the generated tokens as a share of the baseline best-of-n's.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness
from benchmarks.search_scaling import load_records, run_job
from ttc_vllm.search.aggregate import AGGREGATIONS, aggregate_step_scores, decide

BOOTSTRAP = 2000


def decide_answer(rule: str, candidates: list[dict]) -> str | None:
    """The answer `rule` ("majority", or "<weighted_vote|best_of_n>:<aggregation>") picks."""
    kind, _, agg = rule.partition(":")
    answers = [c["answer"] for c in candidates]
    weights = [aggregate_step_scores(c["step_scores"], agg) if agg and c["step_scores"] else 0.0
               for c in candidates]
    index = decide(kind, answers, weights)
    return None if index is None else answers[index]


def rules() -> list[str]:
    return (["majority"] + [f"weighted_vote:{a}" for a in AGGREGATIONS]
            + [f"best_of_n:{a}" for a in AGGREGATIONS])


def ks(n: int, wanted: list[int] | None = None) -> list[int]:
    if wanted:
        return sorted({k for k in wanted if 1 <= k <= n} | {n})
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def outcomes(records: list[dict], k: int) -> dict[str, np.ndarray]:
    """Per rule, 1/0 per problem (records order) with the first k candidates; plus pass@k."""
    out = {rule: np.array([decide_answer(rule, r["candidates"][:k]) == r["expected"] for r in records], float)
           for rule in rules()}
    out["pass@k"] = np.array([any(c["answer"] == r["expected"] for c in r["candidates"][:k])
                              for r in records], float)
    return out


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """Mean of a - b (per problem) with a 95 % bootstrap interval over problems."""
    d = a - b
    return {"points": round(100 * d.mean(), 2), "ci95_points": harness.paired_interval(a, b, BOOTSTRAP, seed),
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


def summarize(records: list[dict], n: int, wanted: list[int] | None = None) -> dict:
    by_k, tokens = {}, {}
    for k in ks(n, wanted):
        res = outcomes(records, k)
        by_k[k] = {rule: round(float(v.mean()), 4) for rule, v in res.items()}
        tokens[k] = round(float(np.mean([sum(c["tokens"] for c in r["candidates"][:k]) for r in records])), 1)
    final = outcomes(records, n)
    vs_majority = {rule: paired(final[rule], final["majority"]) for rule in rules() if rule != "majority"}
    return {"accuracy": by_k, "generated_tokens": tokens, "vs_majority_at_n": vs_majority}


def compare_to_baseline(summary: dict, records: list[dict], baseline: list[dict], tier: str, n: int) -> dict:
    """Each rule at each k here against the baseline run's best-of-n (`min`) on the same
    problems: accuracy, and generated tokens as a share of the baseline best-of-n's."""
    here = {r["index"] for r in records}
    base = sorted((r for r in baseline if r["tier"] == tier and r["index"] in here), key=lambda r: r["index"])
    if len(base) != len(records):
        sys.exit(f"--baseline holds {len(base)} of this run's {len(records)} {tier} problems")
    ref = summarize(base, n, [n])
    ref_acc, ref_tokens = ref["accuracy"][n]["best_of_n:min"], ref["generated_tokens"][n]
    print(f"baseline best-of-{n} (min): {100 * ref_acc:.1f}% with {ref_tokens:.0f} tokens / problem; "
          f"tokens here as a share of that:")
    print("".join(f"  k={k}: {100 * t / ref_tokens:.1f}%" for k, t in summary["generated_tokens"].items()))
    return {"best_of_n_min_accuracy": ref_acc, "best_of_n_tokens": ref_tokens,
            "token_share": {k: round(t / ref_tokens, 4) for k, t in summary["generated_tokens"].items()}}


def format_table(summary: dict, n: int) -> str:
    cols = [str(k) for k in summary["accuracy"]]
    lines = [f"{'rule':22s}" + "".join(f"{'k=' + c:>8s}" for c in cols) + f"   vs majority@{n} (paired, 95% CI)",
             "-" * (22 + 8 * len(cols) + 36)]
    for rule in [*rules(), "pass@k"]:
        accs = "".join(f"{100 * summary['accuracy'][int(c)][rule]:7.1f}%" for c in cols)
        d = summary["vs_majority_at_n"].get(rule)
        extra = (f"   {d['points']:+6.1f} [{d['ci95_points'][0]:+.1f}, {d['ci95_points'][1]:+.1f}]"
                 f"  {d['wins']}W/{d['losses']}L" if d else "")
        lines.append(f"{rule:22s}{accs}{extra}")
    lines.append(f"{'tokens / problem':22s}" + "".join(f"{summary['generated_tokens'][int(c)]:8.0f}" for c in cols))
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks_ = [int(k) for k in summary["accuracy"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {agg: f"C{i}" for i, agg in enumerate(AGGREGATIONS)}
    for rule in [*rules(), "pass@k"]:
        if rule in ("majority", "pass@k"):
            color, ls = ("k", "-") if rule == "majority" else ("grey", ":")
        else:  # colour = aggregation, solid = weighted vote, dashed = best-of-N
            kind, agg = rule.split(":")
            color, ls = colors[agg], "-" if kind == "weighted_vote" else "--"
        ax.plot(ks_, [100 * summary["accuracy"][k][rule] for k in ks_], ls, color=color,
                marker="o", ms=3, label=rule)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks_, [str(k) for k in ks_])
    ax.set_xlabel("samples per problem k (same traces for every rule)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    harness.save_figure(fig, path)


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--tiers", default="hard")
    ap.add_argument("--problems", type=int, default=320)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prm-config", default=None, help="PRMConfig JSON or file (default: the shipped testbed PRM)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/vote_rules"))
    ap.add_argument("--result-name", default="vote_rules")
    ap.add_argument("--summarize-only", action="store_true", help="run nothing; summarize what --out holds")
    ap.add_argument("--controls", default=None,
                    help="in-engine thinking controls for every trace (JSON of ttc options)")
    ap.add_argument("--ks", default=None, help="comma-separated k values to tabulate (default 1, 2, 4, .., n)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another run's --out (same problems, plain traces): compare tokens to its best-of-n")
    ap.add_argument("--from-index", type=int, default=0,
                    help="summarize only problems with index >= this (e.g. a replication slice added "
                         "after a first run chose a rule)")
    a = ap.parse_args()
    if a.n < 1:
        ap.error("--n must be >= 1")

    t0 = time.time()
    if not a.summarize_only:
        prm = ["--prm-config", a.prm_config] if a.prm_config else []
        controls = ["--controls", a.controls] if a.controls else []
        run_job(["--tiers", a.tiers, "--problems", str(a.problems), "--concurrency", str(a.concurrency),
                 "--num-cpus", "2", *prm, *controls, "--strategies", "weighted_vote", "--n", str(a.n),
                 "--temperature", str(a.temperature), "--out", str(a.out)])
    records = [r for r in load_records(a.out) if r["strategy"] == "weighted_vote" and r["n"] == a.n
               and r.get("candidates") and a.from_index <= r["index"] < a.problems]
    if not records:
        sys.exit(f"no weighted_vote n={a.n} records with candidates in {a.out}")
    wanted = [int(k) for k in a.ks.split(",")] if a.ks else None
    baseline = ([r for r in load_records(a.baseline) if r["strategy"] == "weighted_vote" and r["n"] == a.n
                 and r.get("candidates") and a.from_index <= r["index"] < a.problems]
                if a.baseline else None)
    result, tiers = {}, a.tiers.split(",")
    for tier in tiers:
        tier_records = sorted((r for r in records if r["tier"] == tier), key=lambda r: r["index"])
        if not tier_records:
            continue
        summary = summarize(tier_records, a.n, wanted)
        result[tier] = {"problems": len(tier_records), **summary}
        print(f"\n{tier}: {len(tier_records)} problems, {a.n} traces each, temperature {a.temperature}")
        print(format_table(summary, a.n))
        if baseline is not None:
            result[tier]["baseline"] = compare_to_baseline(summary, tier_records, baseline, tier, a.n)
    prm = next((r["setup"]["prm"] for r in records if r["setup"]["prm"]), None)
    # the JSON first: its commit field must not see this run's own plot as a change
    path = harness.write_result(a.result_name, {"tiers": tiers, "n": a.n, "temperature": a.temperature,
                                        "controls": json.loads(a.controls) if a.controls else None,
                                        "baseline_out": str(a.baseline) if a.baseline else None,
                                        "problem_indices": [a.from_index, a.problems],
                                        "prm": prm, "bootstrap": BOOTSTRAP, "by_tier": result,
                                        "seconds": round(time.time() - t0, 1)})
    for tier, summary in result.items():
        plot(summary, harness.RESULTS / f"{a.result_name}.png" if tier == tiers[-1]
             else harness.RESULTS / f"{a.result_name}_{tier}.png",
             f"{tier}: decision rules on the same {a.n} traces x {summary['problems']} problems")
    print(f"wrote {path} and {harness.RESULTS / (a.result_name + '.png')}")


if __name__ == "__main__":
    main()
