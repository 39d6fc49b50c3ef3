"""What goes wrong in the testbed policy's sampled traces, and what each check could buy a
vote, through real vLLM.

    python benchmarks/error_types.py [--tiers hard] [--problems 200] [--k 16] [--temperature 0.8]

Samples k traces per problem (held-out seed) and audits each (`task.audit`): an arithmetic
slip (some C != A + B), a broken chain, or term bookkeeping (a term added more often than
the question has it, so another never; a term the question lacks), with correct arithmetic.
Then oracle filters: majority@k over all traces, over the traces an exact term check passes,
an exact arithmetic check passes, and both (falling back to all traces when none passes).
These bound what a verifier with each check could gain over plain voting; the shipped PRM
(`ttc_vllm/testbed/prm_circuit.py`) approximates the arithmetic check and computes the term
check exactly. Prints tables, writes benchmarks/results/error_types.json and .png.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness
from ttc_vllm.testbed import policy_path

KINDS = ("none", "arithmetic only", "terms only", "arithmetic and terms", "chain", "unparsed")
FILTERS = ("all traces", "term check", "arithmetic check", "both checks")


def kind(a) -> str:
    if not a.parsed:
        return "unparsed"
    if not a.chained:
        return "chain"
    return {(True, True): "none", (False, True): "arithmetic only", (True, False): "terms only",
            (False, False): "arithmetic and terms"}[(a.arithmetic, a.terms)]


def majority(answers):
    answers = [x for x in answers if x is not None]
    return Counter(answers).most_common(1)[0][0] if answers else None


def tier_report(llm, tier: str, problems: int, k: int, temperature: float, seed: int) -> dict:
    from vllm import SamplingParams

    from ttc_vllm.testbed.task import audit, extract_answer, generate, prompt

    probs = generate(tier, problems, seed)
    outs = llm.generate([prompt(p) for p in probs], SamplingParams(temperature=temperature, n=k, max_tokens=400),
                        use_tqdm=False)
    counts = {"right": Counter(), "wrong": Counter()}
    reused = foreign = 0
    wins = Counter()
    for p, out in zip(probs, outs):
        answers, audits = [], []
        for o in out.outputs:
            a = audit(p, o.text)
            ans = extract_answer(o.text)
            answers.append(ans)
            audits.append(a)
            counts["right" if ans == p.answer else "wrong"][kind(a)] += 1
            if ans != p.answer:
                reused += a.reused > 0
                foreign += a.foreign > 0
        keep = {
            "all traces": [True] * k,
            "term check": [a.parsed and a.terms for a in audits],
            "arithmetic check": [a.parsed and a.arithmetic and a.chained for a in audits],
            "both checks": [a.parsed and a.terms and a.arithmetic and a.chained for a in audits],
        }
        for name, mask in keep.items():
            kept = [x for x, m in zip(answers, mask) if m] or answers
            wins[name] += majority(kept) == p.answer
        wins["pass@k"] += p.answer in answers
    wrong = sum(counts["wrong"].values())
    return {
        "tier": tier, "problems": problems, "k": k, "traces": problems * k, "wrong_traces": wrong,
        "kinds": {side: {x: counts[side][x] for x in KINDS} for side in counts},
        "wrong_with_reused_term": reused, "wrong_with_foreign_term": foreign,
        "majority_accuracy": {name: wins[name] / problems for name in FILTERS},
        "pass_at_k": wins["pass@k"] / problems,
    }


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, r in enumerate(rows):
        w = r["kinds"]["wrong"]
        axes[0].barh([f"{r['tier']}: {x}" for x in KINDS], [w[x] / max(1, r["wrong_traces"]) for x in KINDS])
        accs = r["majority_accuracy"]
        xs = [x + 0.4 * i for x in range(len(FILTERS))]
        axes[1].bar(xs, [accs[f] for f in FILTERS], width=0.4, label=r["tier"])
        axes[1].axhline(r["pass_at_k"], ls="--", lw=1, color=f"C{i}", label=f"{r['tier']} pass@{r['k']}")
    axes[0].set_xlabel("share of wrong traces")
    axes[0].set_title("what goes wrong")
    axes[1].set_xticks(range(len(FILTERS)), FILTERS, rotation=15)
    axes[1].set_ylabel(f"majority@{rows[0]['k']} accuracy")
    axes[1].set_title("majority over the traces an exact check passes")
    axes[1].legend(fontsize=8)
    harness.save_figure(fig, path)


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--tiers", default="hard")
    harness.add_sampling_args(ap, problems=200)
    ap.add_argument("--model", default=str(policy_path()))
    a = ap.parse_args()

    from ttc_vllm.engine import make_llm
    from ttc_vllm.testbed.evaluate import HELD_OUT_SEED

    t0 = time.time()
    llm = make_llm(a.model, max_num_seqs=256)
    rows = [tier_report(llm, t, a.problems, a.k, a.temperature, HELD_OUT_SEED) for t in a.tiers.split(",")]
    for r in rows:
        print(f"\n{r['tier']}: {r['traces']} traces, {r['wrong_traces']} with a wrong answer")
        print(f"{'error':<22}{'wrong answer':>14}{'right answer':>14}")
        for x in KINDS:
            print(f"{x:<22}{r['kinds']['wrong'][x]:>14}{r['kinds']['right'][x]:>14}")
        print(f"wrong traces with a reused term: {r['wrong_with_reused_term']}, with a foreign term: "
              f"{r['wrong_with_foreign_term']}")
        print(f"{'majority@' + str(r['k']) + ' over':<22}{'accuracy':>10}")
        for f in FILTERS:
            print(f"{f:<22}{r['majority_accuracy'][f]:>10.1%}")
        print(f"{'pass@' + str(r['k']):<22}{r['pass_at_k']:>10.1%}")
    path = harness.write_result("error_types", {"temperature": a.temperature, "seed": HELD_OUT_SEED, "tiers": rows,
                                        "seconds": round(time.time() - t0, 1)})
    plot(rows, harness.RESULTS / "error_types.png")
    print(f"wrote {path} and {harness.RESULTS / 'error_types.png'}")


if __name__ == "__main__":
    main()
