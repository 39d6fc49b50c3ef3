"""`ttc-vllm demo`: test-time scaling on the shipped testbed policy, end to end on a CPU.

Prints a per-tier table (greedy vs majority@k: accuracy and generated tokens), writes the
numbers as JSON and an accuracy-vs-tokens plot as PNG.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def format_table(rows: list[dict]) -> str:
    head = f"{'tier':<8}{'greedy acc':>11}{'greedy tok':>11}{'maj@k acc':>11}{'maj@k tok':>11}{'k':>4}{'overthink':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['tier']:<8}{r['greedy_accuracy']:>11.1%}{r['greedy_tokens']:>11.1f}"
                     f"{r['majority_accuracy']:>11.1%}{r['majority_tokens']:>11.1f}{r['k']:>4}"
                     f"{r['overthinking_share']:>10.1%}")
    return "\n".join(lines)


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        xs = [c["tokens"] for c in r["curve"]]
        ys = [100 * c["accuracy"] for c in r["curve"]]
        line, = ax.plot(xs, ys, marker="o", label=f"{r['tier']}: majority@k (k={r['curve'][0]['k']}..{r['curve'][-1]['k']})")
        ax.scatter([r["greedy_tokens"]], [100 * r["greedy_accuracy"]], marker="*", s=140, color=line.get_color(),
                   edgecolor="black", zorder=5, label=f"{r['tier']}: greedy")
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem (log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(tiers: list[str], problems: int, k: int, temperature: float, model: Path | None, out: Path) -> list[dict]:
    from ttc_vllm.engine import make_llm
    from ttc_vllm.testbed import policy_path
    from ttc_vllm.testbed.evaluate import evaluate

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    llm = make_llm(str(model or policy_path()))
    t_engine = time.time() - t0
    rows = evaluate(llm, tiers, problems, k, temperature)
    print(format_table(rows))
    record = {"problems_per_tier": problems, "k": k, "temperature": temperature,
              "engine_start_s": round(t_engine, 1), "total_s": round(time.time() - t0, 1), "tiers": rows}
    (out / "demo.json").write_text(json.dumps(record, indent=1))
    plot_curves(rows, out / "demo.png", f"testbed: accuracy vs compute ({problems} problems/tier)")
    print(f"wrote {out / 'demo.json'} and {out / 'demo.png'} ({record['total_s']} s)")
    return rows
