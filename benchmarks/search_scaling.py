"""PRM-guided search on the testbed: accuracy vs generated tokens per strategy, 4-64x compute.

    python benchmarks/search_scaling.py [--tiers medium,hard] [--problems 40] [--n 4,16,64]
        [--strategies majority,weighted_vote,best_of_n,beam,dvts,mcts] [--out runs/bench/search]

Two `ttc-vllm job evaluate` runs on a local Ray head (loopback; one policy replica, one PRM
actor, both real vLLM engines): greedy decoding (temperature 0, n=1) and the strategy x n
grid at temperature 0.8. Both are resumable: rerunning with the same --out skips what is
recorded. Then per (strategy, n, tier): accuracy, generated tokens per problem, the share of
prompt tokens of step requests served from vLLM's prefix cache (`num_cached_tokens`), PRM
tokens and wall time; and the issue's targets on the last tier (hard by default):
- efficiency: the cheapest PRM-guided configuration that reaches best-of-16's accuracy,
  and its generated tokens as a fraction of best-of-16's (target <= 1/4);
- the best strategy at n=16 minus greedy (target >= 30 points).
Prints a table, writes benchmarks/results/search_scaling.json and search_scaling.png
(`--result-name` for another scorer's run beside it, e.g. search_surprise).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness

PRM_GUIDED = ("weighted_vote", "best_of_n", "beam", "dvts", "mcts")


def valid_cell(strategy: str, n: int) -> bool:
    """Whether `job evaluate` runs this grid cell (beam_width must divide n for tree search)."""
    from ttc_vllm.search.options import SearchOptions

    try:
        SearchOptions(strategy=strategy, n=n)
    except ValueError:
        return False
    return True


def run_job(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "ttc_vllm.cli", "job", "evaluate", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def load_records(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of an interrupted run
            pass
    return rows


def summarize(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["strategy"], r["n"], r["tier"]), []).append(r)
    rows = []
    for (strategy, n, tier), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        prompt = sum(r["prompt_tokens"] for r in rs)
        rows.append({
            "strategy": strategy, "n": n, "tier": tier, "problems": len(rs),
            "accuracy": sum(bool(r["correct"]) for r in rs) / len(rs),
            "generated_tokens_per_problem": sum(r["generated_tokens"] for r in rs) / len(rs),
            "prompt_tokens_per_problem": prompt / len(rs),
            "cached_prompt_share": sum(r["cached_prompt_tokens"] for r in rs) / prompt if prompt else 0.0,
            "prm_tokens_per_problem": sum(r["prm_tokens"] for r in rs) / len(rs),
            "generator_calls_per_problem": sum(r["generator_calls"] for r in rs) / len(rs),
            "wall_s_per_problem": sum(r["wall_time_s"] for r in rs) / len(rs),
        })
    return rows


def targets(rows: list[dict], greedy: dict[str, float], tier: str) -> dict:
    """The issue's two targets on `tier` (None where the grid lacks what they need)."""
    at = {(r["strategy"], r["n"]): r for r in rows if r["tier"] == tier}
    out: dict = {"tier": tier, "greedy_accuracy": greedy.get(tier)}
    bon16 = at.get(("best_of_n", 16))
    if bon16:
        reach = [r for (s, _), r in at.items() if s in PRM_GUIDED
                 and r["accuracy"] >= bon16["accuracy"] - 1e-9]
        best = min(reach, key=lambda r: r["generated_tokens_per_problem"])
        out["best_of_16"] = {"accuracy": bon16["accuracy"], "tokens": bon16["generated_tokens_per_problem"]}
        out["cheapest_reaching_best_of_16"] = {
            "strategy": best["strategy"], "n": best["n"], "accuracy": best["accuracy"],
            "tokens": best["generated_tokens_per_problem"],
            "token_fraction_of_best_of_16": best["generated_tokens_per_problem"] / bon16["generated_tokens_per_problem"],
        }
        out["efficiency_target_met"] = out["cheapest_reaching_best_of_16"]["token_fraction_of_best_of_16"] <= 0.25
    at16 = [r for (s, n), r in at.items() if n == 16]
    if at16 and tier in greedy:
        top = max(at16, key=lambda r: r["accuracy"])
        out["best_at_16"] = {"strategy": top["strategy"], "accuracy": top["accuracy"],
                             "points_over_greedy": 100 * (top["accuracy"] - greedy[tier])}
        out["greedy_gap_target_met"] = out["best_at_16"]["points_over_greedy"] >= 30
    return out


def format_table(rows: list[dict], greedy: dict[str, float]) -> str:
    head = (f"{'tier':<8}{'strategy':<14}{'n':>4}{'acc':>8}{'gen tok':>10}{'cached':>8}"
            f"{'prm tok':>10}{'calls':>7}{'wall s':>8}")
    lines = [head, "-" * len(head)]
    for tier, acc in greedy.items():
        lines.append(f"{tier:<8}{'greedy':<14}{1:>4}{acc:>8.1%}")
    for r in rows:
        lines.append(f"{r['tier']:<8}{r['strategy']:<14}{r['n']:>4}{r['accuracy']:>8.1%}"
                     f"{r['generated_tokens_per_problem']:>10.0f}{r['cached_prompt_share']:>8.1%}"
                     f"{r['prm_tokens_per_problem']:>10.0f}{r['generator_calls_per_problem']:>7.1f}"
                     f"{r['wall_s_per_problem']:>8.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], greedy: dict[str, float], path: Path, problems: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = list(dict.fromkeys(r["tier"] for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    markers = "osD^v<>ph*"
    fig, axes = plt.subplots(1, len(tiers), figsize=(6.0 * len(tiers), 4.6), squeeze=False)
    for ax, tier in zip(axes[0], tiers):
        for si, strategy in enumerate(strategies):
            pts = sorted((r["n"], r["generated_tokens_per_problem"], 100 * r["accuracy"])
                         for r in rows if r["tier"] == tier and r["strategy"] == strategy)
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker=markers[si % len(markers)],
                    label=strategy)
            for n, x, y in pts:
                ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        if tier in greedy:
            ax.axhline(100 * greedy[tier], color="grey", linestyle=":", label="greedy")
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens per problem (log; labels = n)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.set_title(f"{tier} ({problems} problems)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("testbed: accuracy vs generated tokens (PRM-guided search, real vLLM + Ray)")
    harness.save_figure(fig, path)


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--tiers", default="medium,hard")
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--n", default="4,16,64")
    ap.add_argument("--strategies", default="majority,weighted_vote,best_of_n,beam,dvts,mcts")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--concurrency", type=int, default=16, help="problems in flight")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/search"))
    ap.add_argument("--prm-config", default=None, help="PRMConfig JSON or file (default: the shipped testbed PRM)")
    ap.add_argument("--result-name", default="search_scaling",
                    help="benchmarks/results/<name>.json and .png (keep the shipped PRM's grid apart)")
    ap.add_argument("--summarize-only", action="store_true",
                    help="run nothing: table, JSON and plot of what --out holds (a partial grid too)")
    a = ap.parse_args()

    t0 = time.time()
    common = ["--tiers", a.tiers, "--problems", str(a.problems), "--concurrency", str(a.concurrency),
              "--num-cpus", "2"]
    if not a.summarize_only:
        run_job([*common, "--strategies", "majority", "--n", "1", "--temperature", "0",
                 "--out", str(a.out / "greedy")])
        prm = ["--prm-config", a.prm_config] if a.prm_config else []
        run_job([*common, *prm, "--strategies", a.strategies, "--n", a.n,
                 "--temperature", str(a.temperature), "--out", str(a.out / "grid")])
    greedy = {r["tier"]: r["accuracy"] for r in summarize(load_records(a.out / "greedy"))}
    records = load_records(a.out / "grid")
    rows = summarize(records)
    tiers = a.tiers.split(",")
    goal = targets(rows, greedy, tiers[-1])
    print(format_table(rows, greedy))
    print(json.dumps(goal, indent=1))
    # the search settings shared by the grid (strategy and n vary by row)
    setups = {json.dumps(r["setup"]["options"] | {"strategy": None, "n": None}, sort_keys=True)
              for r in records}
    have = {(r["tier"], r["strategy"], r["n"]) for r in rows if r["problems"] == a.problems}
    missing = [f"{t}/{st}/n={n}" for t in tiers for st in a.strategies.split(",") for n in map(int, a.n.split(","))
               if valid_cell(st, n) and (t, st, n) not in have]
    complete = not missing
    path = harness.write_result(a.result_name, {
        "tiers": tiers, "problems_per_tier": a.problems, "n": a.n, "temperature": a.temperature,
        "search": [json.loads(x) for x in sorted(setups)],
        "prm": next((r["setup"]["prm"] for r in records if r["setup"]["prm"]), None),
        "greedy": greedy, "rows": rows, "targets": goal, "complete_grid": complete, "missing_cells": missing,
        "seconds": round(time.time() - t0, 1),
    })
    plot(rows, greedy, harness.RESULTS / f"{a.result_name}.png", a.problems)
    print(f"wrote {path} and {harness.RESULTS / (a.result_name + '.png')}")


if __name__ == "__main__":
    main()
