"""Step-level process signals on held-out testbed traces, against the exact ground truth.

    python benchmarks/prm_signals.py [--labels runs/prm/labels_mc4.jsonl ...] [--holdout 0.15] [--seed 0]

Label files come from `ttc-vllm job prm-data` (default: the three the shipped PRM was trained
on, as its training.json lists them). Only the trainer's held-out problems count
(`train_prm.held_out(problem, holdout, seed)` with the shipped PRM's split), so the PRM never
saw them. Each signal scores every step end; the AUC is against `exact_prefix_correct`
(every step so far is right), over all steps and over non-final steps:
  shipped PRM       the testbed PRM through vLLM's pooling runner (the serving path)
  policy surprise   the `policy_surprise` scorer: exp of the running minimum over the trace
                    so far of log p(token) - log max p under the policy (the sampled-margin
                    signal of the in-engine halting), from vLLM's prompt log-probs
  MC labels         what the PRM is trained on: HE (any rollout right) and the MC value
                    (rollouts from that step, so not a scorer; the ceiling of its targets)
Prints a table, writes benchmarks/results/prm_signals.json and .png (ROC curves).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]


def roc_points(scores, labels, points: int = 200):
    pairs = sorted(zip(scores, labels), key=lambda p: -p[0])
    pos = sum(labels) or 1
    neg = (len(labels) - sum(labels)) or 1
    tp = fp = 0
    curve = [(0.0, 0.0)]
    for i, (_, y) in enumerate(pairs):
        tp += y
        fp += not y
        if i % max(1, len(pairs) // points) == 0 or i == len(pairs) - 1:
            curve.append((fp / neg, tp / pos))
    return curve


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--labels", type=Path, nargs="+", default=None)
    ap.add_argument("--holdout", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from ttc_vllm.prm.label import read_jsonl
    from ttc_vllm.prm.scorers import PolicySurpriseScorer, PRMConfig, VLLMPoolingPRM
    from ttc_vllm.testbed import policy_path, prm_path, prm_scorer_config
    from ttc_vllm.testbed.train_prm import evaluate, held_out, traces_from_rows

    shipped = json.loads((Path(prm_path()) / "training.json").read_text())
    labels = a.labels or [ROOT / p for p in shipped["labels"]]
    missing = [str(p) for p in labels if not Path(p).exists()]
    if missing:
        raise SystemExit(f"label files not found: {missing} (make them with `ttc-vllm job prm-data`, "
                         f"see {Path(prm_path()) / 'training.json'} for the commands' outputs)")
    data = [d for p in labels for d in traces_from_rows(read_jsonl(p))
            if held_out(d.problem_key, a.holdout, a.seed)]
    traces = [d.trace for d in data]
    print(f"{len(data)} held-out traces, {sum(len(d.exact) for d in data)} steps", flush=True)

    t0 = time.time()
    prm = VLLMPoolingPRM(prm_scorer_config(engine_kwargs={"kv_cache_memory_bytes": 256 << 20,
                                                          "max_model_len": 512}))
    signals = {"shipped PRM": prm.score_sync(traces)}
    harness.shutdown(prm.llm)
    surprise = PolicySurpriseScorer(PRMConfig(kind="policy_surprise", model=str(policy_path())))
    signals["policy surprise"] = surprise.score_sync(traces)
    harness.shutdown(surprise.llm)
    signals["MC labels: HE (any rollout right)"] = [[float(m > 0) for m in d.mc_values] for d in data]
    signals["MC labels: MC value"] = [list(d.mc_values) for d in data]
    seconds = time.time() - t0

    rows, curves = [], {}
    for name, per_trace in signals.items():
        m = evaluate(per_trace, data)   # the trainer's own step AUCs
        rows.append(dict(signal=name, steps=m["steps"], auc_exact=m["auc_exact"],
                         auc_exact_nonfinal=m["auc_exact_nonfinal"]))
        curves[name] = roc_points([v for s in per_trace for v in s],
                                  [bool(e) for d in data for e in d.exact])
    print(harness.table(["signal", "steps", "AUC vs exact", "non-final steps"],
                   [[r["signal"], r["steps"], f"{r['auc_exact']:.3f}", f"{r['auc_exact_nonfinal']:.3f}"]
                    for r in rows]))
    print("target (issue #4): the PRM's step AUC >= 0.85")
    path = harness.write_result("prm_signals", {
        "labels": [str(Path(p).relative_to(ROOT)) if Path(p).is_absolute() else str(p) for p in labels],
        "holdout": a.holdout, "seed": a.seed, "traces": len(data), "rows": rows,
        "shipped_prm_test_auc_in_training_json": shipped.get("test", {}).get("auc_exact"),
        "seconds": round(seconds, 1),
    })
    plot(rows, curves, harness.RESULTS / "prm_signals.png")
    print(f"wrote {path} and {harness.RESULTS / 'prm_signals.png'}")


def plot(rows, curves, path) -> None:
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for i, r in enumerate(rows):
        xs, ys = zip(*curves[r["signal"]])
        ax.plot(xs, ys, color=f"C{i}", label=f"{r['signal']} (AUC {r['auc_exact']:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="gray", lw=0.8)
    ax.set_xlabel("false positive rate (wrong prefixes scored good)")
    ax.set_ylabel("true positive rate")
    ax.set_title("held-out testbed steps vs exact ground truth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
