"""The job's results as a table, OUT/summary.json and OUT/accuracy_vs_tokens.png: accuracy
and generated tokens per strategy x n x tier."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from ttc_vllm.jobs.plan import Key, Plan
from ttc_vllm.jobs.store import ResultStore

SUMMARY_FILE = "summary.json"
PLOT_FILE = "accuracy_vs_tokens.png"


def summarize(plan: Plan, done: dict[Key, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (strategy, n, tier) of the plan over its recorded items: accuracy and
    mean tokens per problem."""
    rows = []
    for strategy in plan.strategies:
        for n in sorted(plan.ns):
            for tier in plan.tiers:
                keys = [(strategy, n, p.tier, p.index) for p in plan.problems if p.tier == tier]
                records = [done[k] for k in keys if k in done]
                count = len(records)

                def mean(field: str) -> float:
                    return sum(r[field] for r in records) / count if count else 0.0

                rows.append({
                    "strategy": strategy, "n": n, "tier": tier, "problems": len(keys),
                    "done": count, "correct": sum(bool(r["correct"]) for r in records),
                    "accuracy": sum(bool(r["correct"]) for r in records) / count if count else 0.0,
                    "generated_tokens_per_problem": mean("generated_tokens"),
                    "prm_tokens_per_problem": mean("prm_tokens"),
                    "wall_s_per_problem": mean("wall_time_s"),
                })
    return rows


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    head = (f"{'strategy':<14}{'n':>4}  {'tier':<10}{'done':>9}{'accuracy':>10}"
            f"{'gen tok/prob':>14}{'prm tok/prob':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['strategy']:<14}{r['n']:>4}  {r['tier']:<10}"
                     f"{str(r['done']) + '/' + str(r['problems']):>9}{r['accuracy']:>10.1%}"
                     f"{r['generated_tokens_per_problem']:>14.1f}{r['prm_tokens_per_problem']:>14.1f}")
    return "\n".join(lines)


def plot_accuracy_vs_tokens(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against generated tokens per problem: one line per (strategy, tier) over n;
    colour = tier, marker = strategy."""
    from ttc_vllm.plots import pyplot, save_figure, style_accuracy_vs_tokens

    plt = pyplot()
    tiers = list(dict.fromkeys(r["tier"] for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>ph*"
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for ti, tier in enumerate(tiers):
        for si, strategy in enumerate(strategies):
            pts = sorted((r["n"], r["generated_tokens_per_problem"], 100 * r["accuracy"])
                         for r in rows if r["tier"] == tier and r["strategy"] == strategy and r["done"])
            if not pts:
                continue
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker=markers[si % len(markers)],
                    color=colours[ti % len(colours)], linestyle=["-", "--", ":", "-."][si % 4],
                    label=f"{tier} / {strategy} (n={','.join(str(p[0]) for p in pts)})")
    style_accuracy_vs_tokens(ax, title, y_max=102,
                             log_x=any(r["generated_tokens_per_problem"] > 0 for r in rows))
    save_figure(fig, path)


def write_summary(plan: Plan, store: ResultStore, extra: dict[str, Any]) -> dict[str, Any]:
    rows = summarize(plan, store.done)
    record = {**extra, "strategies": plan.strategies, "n": sorted(plan.ns), "tiers": plan.tiers,
              "policy": plan.policy, "prm": plan.prm, "search": plan.search, "rows": rows}
    path = store.directory / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    plot_accuracy_vs_tokens(rows, store.directory / PLOT_FILE,
                            f"accuracy vs compute ({len(plan.problems)} problems)")
    return record
