"""Numbers of the testbed model card (ttc_vllm/testbed/README.md), through real vLLM.

    python benchmarks/testbed_card.py [--problems 300] [--k 16] [--temperature 0.8]

Per tier on a held-out seed: greedy accuracy, majority@k accuracy, mean thinking tokens,
share of thinking tokens spent after the answer first appears (overthinking). Prints a
table, writes benchmarks/results/testbed_card.json and testbed_card.png.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness
from ttc_vllm.testbed import policy_path


def main() -> None:
    ap = harness.parser(__doc__)
    harness.add_sampling_args(ap, problems=300)
    ap.add_argument("--model", default=str(policy_path()))
    a = ap.parse_args()

    from ttc_vllm.demo import format_table, plot_curves
    from ttc_vllm.engine import make_llm
    from ttc_vllm.testbed.evaluate import HELD_OUT_SEED, evaluate
    from ttc_vllm.testbed.task import TIERS

    t0 = time.time()
    llm = make_llm(a.model, max_num_seqs=256)
    rows = evaluate(llm, list(TIERS), a.problems, a.k, a.temperature)
    total_think = sum(r["greedy_thinking_tokens"] for r in rows)
    print(format_table(rows))
    overall = sum(r["sampled_overthinking_tokens"] for r in rows) / max(1, sum(r["sampled_thinking_tokens"] for r in rows))
    print(f"overall overthinking share of sampled thinking tokens: {overall:.1%}")
    path = harness.write_result("testbed_card", {
        "problems_per_tier": a.problems, "k": a.k, "temperature": a.temperature, "seed": HELD_OUT_SEED,
        "tiers_knobs": {n: vars(t) for n, t in TIERS.items()}, "tiers": rows,
        "overall_overthinking_share": overall, "greedy_thinking_tokens_total": total_think,
        "seconds": round(time.time() - t0, 1),
    })
    plot_curves(rows, harness.RESULTS / "testbed_card.png", f"testbed policy: greedy vs majority@k ({a.problems}/tier)")
    print(f"wrote {path} and {harness.RESULTS / 'testbed_card.png'}")


if __name__ == "__main__":
    main()
