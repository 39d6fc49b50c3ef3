"""`ttc-vllm demo`: test-time scaling on the shipped testbed policy, end to end on a CPU.

Prints a per-tier table (greedy vs majority@k: accuracy and generated tokens), writes the
numbers as JSON and an accuracy-vs-tokens plot as PNG. Unless `--verbose`, vLLM's engine logs
are hidden (`quiet_engine`), so the whole output fits one screen.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import MutableMapping
from pathlib import Path

# What `ttc-vllm demo` sets (unless already set) so that its table is not lost among vLLM's
# start-up and shutdown lines; `--verbose` leaves everything as it is. Read by vLLM and torch
# when they are imported, and inherited by the engine's processes.
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",   # vLLM's INFO and WARNING lines (config, loading, shutdown)
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # torch's C++ warnings (NUMA binding on CPU)
    "TQDM_DISABLE": "1",             # library progress bars
    # in the engine's processes; and the resource tracker's note, at exit, that it removes the
    # shared memory the engine leaves behind
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,"
                      "ignore::UserWarning:multiprocessing.resource_tracker",
}


def quiet_engine(env: MutableMapping[str, str] = os.environ) -> None:
    """Lower vLLM's logging, torch's C++ warnings, progress bars and deprecation warnings for
    this process and the engine processes it starts. Call before vLLM is imported. ttc-vllm's
    own warnings (loggers `ttc_vllm.*`) still show."""
    for key, value in QUIET_ENV.items():
        env.setdefault(key, value)
    # vLLM applies its logging configuration when an engine is built; what it logs while being
    # imported (a Triton notice on CPU) would reach Python's last-resort handler before that.
    try:
        logging.getLogger("vllm").setLevel(env["VLLM_LOGGING_LEVEL"].upper())
    except ValueError:  # not a level name: vLLM will say so itself
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def format_table(rows: list[dict]) -> str:
    head = f"{'tier':<8}{'greedy acc':>11}{'greedy tok':>11}{'maj@k acc':>11}{'maj@k tok':>11}{'k':>4}{'overthink':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['tier']:<8}{r['greedy_accuracy']:>11.1%}{r['greedy_tokens']:>11.1f}"
                     f"{r['majority_accuracy']:>11.1%}{r['majority_tokens']:>11.1f}{r['k']:>4}"
                     f"{r['overthinking_share']:>10.1%}")
    return "\n".join(lines)


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    from ttc_vllm.plots import pyplot, save_figure, style_accuracy_vs_tokens

    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    for r in rows:
        xs = [c["tokens"] for c in r["curve"]]
        ys = [100 * c["accuracy"] for c in r["curve"]]
        line, = ax.plot(xs, ys, marker="o", label=f"{r['tier']}: majority@k (k={r['curve'][0]['k']}..{r['curve'][-1]['k']})")
        ax.scatter([r["greedy_tokens"]], [100 * r["greedy_accuracy"]], marker="*", s=140, color=line.get_color(),
                   edgecolor="black", zorder=5, label=f"{r['tier']}: greedy")
    style_accuracy_vs_tokens(ax, title)
    save_figure(fig, path)


def run_demo(tiers: list[str], problems: int, k: int, temperature: float, model: Path | None, out: Path,
             verbose: bool = False) -> list[dict]:
    from ttc_vllm.engine import make_llm
    from ttc_vllm.testbed import policy_path
    from ttc_vllm.testbed.evaluate import evaluate

    out.mkdir(parents=True, exist_ok=True)
    hidden = "" if verbose else "; engine logs hidden (--verbose shows them)"
    print(f"greedy vs majority@{k} (T={temperature}) on {problems} problems per tier, through vLLM{hidden}",
          flush=True)
    t0 = time.time()
    llm = make_llm(str(model or policy_path()), **({} if verbose else {"use_tqdm_on_load": False}))
    t_engine = time.time() - t0
    print(f"engine started in {t_engine:.0f} s", flush=True)
    rows = []
    try:
        for tier in tiers:
            t_tier = time.time()
            rows += evaluate(llm, [tier], problems, k, temperature)
            print(f"  {tier}: {problems} problems x (1 greedy + {k} samples) in {time.time() - t_tier:.0f} s",
                  flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()  # now, rather than at interpreter exit
    print()
    print(format_table(rows))
    record = {"problems_per_tier": problems, "k": k, "temperature": temperature,
              "engine_start_s": round(t_engine, 1), "total_s": round(time.time() - t0, 1), "tiers": rows}
    (out / "demo.json").write_text(json.dumps(record, indent=1))
    plot_curves(rows, out / "demo.png", f"testbed: accuracy vs compute ({problems} problems/tier)")
    print(f"wrote {out / 'demo.json'} and {out / 'demo.png'} ({record['total_s']} s)")
    return rows
