"""Voting that samples less: in-engine controls on every trace (a thinking cap, DeepConf stop
of weak traces) plus adaptive sampling (`search.adaptive`: waves until the answers agree),
against plain majority@16 on the same problems.

    python benchmarks/adaptive_voting.py [--tiers medium,hard] [--problems 100] [--seed 30000]
        [--controls JSON] [--adaptive JSON] [--out runs/bench/adaptive_voting] [--pool DIR ...]
        [--result-name adaptive_voting]

Three `ttc-vllm job evaluate` runs on a local Ray head (loopback; one policy replica, one PRM
actor, real vLLM engines), each resumable in its own folder under --out:
  plain           weighted_vote n=16, no controls: every trace is kept, so majority@16 (and
                  PRM-weighted @16) are decided offline from the recorded candidates, and
                  its generated tokens are the reference
  majority        majority n=16 with --controls and --adaptive: log-prob signals only
  weighted vote   weighted_vote n=16 with --controls and --adaptive: decided by PRM weight;
                  the exit counts answers, or PRM weights with exit_votes "weighted"
Defaults: the controls that `controls_voting.py` chose on its calibration slice (cap 112 with
the step conclusion; stop a trace when its lowest 16-token group confidence drops below
12.456), and the exit `--calibrate` chose on seeds 20000 + 50000 (400 problems) at <= 0
points among the counted exits: waves 3,3,4,6, consensus 0.6 of the answered traces. The
problems here come from other seeds (default 30000), so nothing was chosen on them.
Generated tokens count every token of every sampled trace, stopped ones included. Paired: the same problems in every arm (not the same samples).
Prints a table, writes benchmarks/results/adaptive_voting.json and .png.

`--calibrate` chooses the exit instead, on a calibration slice (default seed 20000; --pool
adds other calibration folders): a plain run and a run with the controls but no exit (all 16
traces, PRM-scored), then, offline, every exit of --waves x --consensus on the controlled
traces in sampling order (traces are exchangeable, so the first k are a wave schedule's first
waves), for majority, weighted vote with the PRM-weighted exit, and weighted vote with the
counted exit (`exit_votes: "counted"`). It prints the sweep and writes
benchmarks/results/adaptive_voting_calibration.json with, per vote, the exit with the most
tokens saved at <= --select-loss points below plain majority@16 (default 0: exits chosen at
<= 1 point on 200 calibration problems lost 3-4 points on 400 fresh ones, so the choice keeps
a margin).
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
from ttc_vllm.search.aggregate import aggregate_step_scores, decide, leading_share

N = 16
BOOTSTRAP = 2000
DEFAULT_CONTROLS = {"max_think": 112, "conclusion": "<step>\n",
                    "halting": {"signal": "group_confidence", "aggregate": "min", "window": 16,
                                "threshold": 12.456, "direction": "below", "action": "stop"}}
ARM_LABELS = {"majority": "majority, controls + adaptive", "weighted_vote": "weighted vote, controls + adaptive"}
DEFAULT_ADAPTIVE = {"waves": [3, 3, 4, 6], "consensus": 0.6, "min_votes": 2, "exit_votes": "counted"}
# the votes --calibrate sweeps: (vote, what the exit counts)
VOTES = (("majority", "counted"), ("weighted_vote", "weighted"), ("weighted_vote", "counted"))


def offline(record: dict, rule: str) -> str | None:
    """majority or weighted_vote (min) over a plain record's 16 candidates."""
    cands = record["candidates"]
    answers = [c["answer"] for c in cands]
    weights = [aggregate_step_scores(c["step_scores"], "min") if c["step_scores"] else 0.0 for c in cands]
    i = decide(rule, answers, weights)
    return None if i is None else answers[i]


def simulate_exit(record: dict, weighted: bool, waves: list[int], consensus: float, min_votes: int,
                  counted_exit: bool = False):
    """(correct, tokens, traces) of search.adaptive's exit replayed on a record's candidates
    (sampling order): the rule of ttc_vllm/search/adaptive.py, decided like the search
    (`counted_exit`: weighted vote that stops on counted agreement)."""
    cands = record["candidates"]
    answers = [c["answer"] for c in cands]
    prm_exit = weighted and not counted_exit
    weights = [aggregate_step_scores(c["step_scores"], "min") if prm_exit and c["step_scores"] else 1.0
               for c in cands]
    take = 0
    for size in waves:
        take = min(take + size, len(cands))
        if leading_share(answers[:take], weights[:take], min_votes) >= consensus:
            break
    sub = {**record, "candidates": cands[:take]}
    answer = offline(sub, "weighted_vote" if weighted else "majority")
    return answer == record["expected"], sum(c["tokens"] for c in cands[:take]), take


def calibrate(a, controls: dict) -> None:
    common = ["--tiers", a.tiers, "--problems", str(a.problems), "--seed", str(a.seed), "--n", str(N),
              "--concurrency", str(a.concurrency), "--num-cpus", "2", "--temperature", "0.8"]
    if not a.summarize_only:
        run_job([*common, "--strategies", "weighted_vote", "--out", str(a.out / "plain")])
        run_job([*common, "--strategies", "weighted_vote", "--controls", a.controls, "--out", str(a.out / "controls")])
    folders = [a.out, *a.pool]
    plain = {(f, r["tier"], r["index"]): r for f, d in enumerate(folders)
             for r in load_records(d / "plain") if r["n"] == N}
    ctrl = {(f, r["tier"], r["index"]): r for f, d in enumerate(folders)
            for r in load_records(d / "controls") if r["n"] == N}
    keys = sorted(set(plain) & set(ctrl))
    base_acc = float(np.mean([offline(plain[k], "majority") == plain[k]["expected"] for k in keys]))
    base_tokens = float(np.mean([plain[k]["generated_tokens"] for k in keys]))
    schedules = [[int(x) for x in w.split(",")] for w in a.waves.split(";") if w.strip()]
    sweep = []
    for vote, exit_votes in VOTES:
        for waves in schedules:
            for c in (float(x) for x in a.consensus.split(",")):
                sims = [simulate_exit(ctrl[k], vote == "weighted_vote", waves, c, 2, exit_votes == "counted")
                        for k in keys]
                acc = float(np.mean([x[0] for x in sims]))
                tokens = float(np.mean([x[1] for x in sims]))
                sweep.append(dict(vote=vote, waves=waves, consensus=c, min_votes=2, exit_votes=exit_votes,
                                  accuracy=acc, tokens=tokens,
                                  traces=float(np.mean([x[2] for x in sims])),
                                  loss_points=100 * (base_acc - acc), tokens_saved=1 - tokens / base_tokens))
    print(f"\ncalibration: {len(keys)} problems ({', '.join(map(str, folders))}); plain majority@16 {base_acc:.1%}, "
          f"{base_tokens:.0f} tokens; exits replayed on the controlled traces ({a.controls})")
    print(f"{'vote':15}{'exit':10}{'waves':16}{'consensus':>10}{'acc':>7}{'loss pts':>10}{'saved':>8}{'traces':>8}")
    for x in sweep:
        print(f"{x['vote']:15}{x['exit_votes']:10}{','.join(map(str, x['waves'])):16}{x['consensus']:10g}"
              f"{100 * x['accuracy']:7.1f}"
              f"{x['loss_points']:10.1f}{100 * x['tokens_saved']:7.1f}%{x['traces']:8.1f}")
    chosen = {}
    for vote, exit_votes in VOTES:
        name = f"{vote} ({exit_votes} exit)"
        ok = [x for x in sweep if x["vote"] == vote and x["exit_votes"] == exit_votes
              and x["loss_points"] <= a.select_loss + 1e-9]
        chosen[name] = max(ok, key=lambda x: x["tokens_saved"]) if ok else None
        print(f"chosen ({name}): {chosen[name]}")
    path = harness.write_result(a.result_name, {
        "tiers": a.tiers.split(","), "problems_per_tier": a.problems, "seed": a.seed, "n": N,
        "folders": [str(f) for f in folders], "problems": len(keys),
        "controls": controls, "select_loss_points": a.select_loss,
        "plain_majority16": {"accuracy": base_acc, "tokens": base_tokens}, "sweep": sweep, "chosen": chosen})
    print(f"wrote {path}")


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--tiers", default="medium,hard")
    ap.add_argument("--problems", type=int, default=100, help="problems per tier")
    ap.add_argument("--seed", type=int, default=30_000, help="testbed problem seed (default: a fresh slice)")
    ap.add_argument("--controls", default=json.dumps(DEFAULT_CONTROLS))
    ap.add_argument("--adaptive", default=json.dumps(DEFAULT_ADAPTIVE))
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/adaptive_voting"))
    ap.add_argument("--summarize-only", action="store_true")
    ap.add_argument("--pool", type=Path, nargs="*", default=[],
                    help="other --out folders of this script (other seeds) to summarize together with --out")
    ap.add_argument("--result-name", default=None,
                    help="default adaptive_voting (adaptive_voting_calibration with --calibrate)")
    ap.add_argument("--plain-out", type=Path, default=None,
                    help="the plain arm's folder (default OUT/plain): reuse another run's plain traces")
    ap.add_argument("--arms", default="majority,weighted_vote",
                    help="controlled arms to run and report (besides plain): majority and/or weighted_vote")
    ap.add_argument("--calibrate", action="store_true", help="choose the exit on a calibration slice (see above)")
    ap.add_argument("--waves", default="4,4,4,4;2,2,4,4,4", help="--calibrate: wave schedules swept")
    ap.add_argument("--consensus", default="0.6,0.75,0.8,0.85,0.9,0.95,1.0", help="--calibrate: consensus swept")
    ap.add_argument("--select-loss", type=float, default=0.0,
                    help="--calibrate: points below majority@16 allowed on calibration (0: a margin, see above)")
    a = ap.parse_args()
    controls, adaptive = json.loads(a.controls), json.loads(a.adaptive)
    if a.calibrate:
        if a.seed == 30_000:
            a.seed = 20_000   # the calibration slice, never an evaluation one
        a.result_name = a.result_name or "adaptive_voting_calibration"
        calibrate(a, controls)
        return
    a.result_name = a.result_name or "adaptive_voting"

    t0 = time.time()
    common = ["--tiers", a.tiers, "--problems", str(a.problems), "--seed", str(a.seed), "--n", str(N),
              "--concurrency", str(a.concurrency), "--num-cpus", "2", "--temperature", "0.8"]
    arms = {"plain": (a.plain_out or a.out / "plain", ["--strategies", "weighted_vote"]),
            "majority": (a.out / "majority", ["--strategies", "majority", "--controls", a.controls,
                                              "--adaptive", a.adaptive]),
            "weighted_vote": (a.out / "weighted_vote", ["--strategies", "weighted_vote", "--controls",
                                                        a.controls, "--adaptive", a.adaptive])}
    chosen_arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    if not chosen_arms or any(x not in ARM_LABELS for x in chosen_arms):
        ap.error(f"--arms: choose from {', '.join(ARM_LABELS)}")
    arms = {name: v for name, v in arms.items() if name == "plain" or name in chosen_arms}
    seconds = {}
    for name, (out, extra) in arms.items():
        if not a.summarize_only:
            t1 = time.time()
            run_job([*common, *extra, "--out", str(out)])
            seconds[name] = round(time.time() - t1, 1)
    folders = [a.out, *a.pool]
    recs = {name: {(f, r["tier"], r["index"]): r for f, base in enumerate(folders)
                   for r in load_records(out if f == 0 else base / out.name) if r["n"] == N}
            for name, (out, _) in arms.items()}
    keys = sorted(set.intersection(*(set(r) for r in recs.values())))
    if not keys:
        sys.exit(f"no problems recorded by every arm under {a.out}")
    rng = np.random.default_rng(0)
    rows = []
    tiers = a.tiers.split(",")
    for tier in tiers + ["all"]:
        ks = [k for k in keys if tier in ("all", k[1])]
        plain = [recs["plain"][k] for k in ks]
        base_ok = np.array([offline(r, "majority") == r["expected"] for r in plain])
        base_tokens = float(np.mean([r["generated_tokens"] for r in plain]))
        cells = [("majority@16 (plain)", base_ok, base_tokens, float(N)),
                 ("weighted vote@16 (plain)", np.array([offline(r, "weighted_vote") == r["expected"] for r in plain]),
                  base_tokens, float(N))]
        for name, label in ((x, ARM_LABELS[x]) for x in chosen_arms):
            rs = [recs[name][k] for k in ks]
            cells.append((label, np.array([bool(r["correct"]) for r in rs]),
                          float(np.mean([r["generated_tokens"] for r in rs])),
                          float(np.mean([len(r["candidates"]) for r in rs]))))
        for label, ok, tokens, traces in cells:
            rows.append(dict(tier=tier, arm=label, problems=len(ks), accuracy=float(ok.mean()), tokens=tokens,
                             traces=traces, tokens_saved=1 - tokens / base_tokens,
                             loss_points=100 * float(base_ok.mean() - ok.mean()),
                             vs_majority16_ci95_points=harness.paired_interval(ok, base_ok, BOOTSTRAP, rng)))
    print(f"\n{len(keys)} problems ({', '.join(map(str, folders))}); tokens = generated tokens per problem, "
          "every sampled trace")
    print(f"controls: {a.controls}\nadaptive: {a.adaptive}")
    head = f"{'tier':8}{'arm':38}{'acc':>7}{'tokens':>8}{'traces':>8}{'saved':>8}{'loss pts':>10}  paired 95% CI"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['tier']:8}{r['arm']:38}{100 * r['accuracy']:7.1f}{r['tokens']:8.0f}{r['traces']:8.1f}"
              f"{100 * r['tokens_saved']:7.1f}%{r['loss_points']:10.1f}  {r['vs_majority16_ci95_points']}")
    verdict = {}
    for arm in (ARM_LABELS[x] for x in chosen_arms):
        r = next(x for x in rows if x["tier"] == "all" and x["arm"] == arm)
        verdict[arm] = dict(tokens_saved=r["tokens_saved"], loss_points=r["loss_points"],
                            met=r["tokens_saved"] >= 0.60 and r["loss_points"] <= 1.0 + 1e-9)
        print(f"target ({arm}): >= 60% fewer tokens than majority@16 at <= 1 point loss -> "
              f"saved {r['tokens_saved']:.1%}, loss {r['loss_points']:.1f}: {'MET' if verdict[arm]['met'] else 'NOT MET'}")
    path = harness.write_result(a.result_name, {
        "tiers": tiers, "problems_per_tier": a.problems, "seed": a.seed, "n": N, "temperature": 0.8,
        "folders": [str(f) for f in folders], "problems": len(keys),
        "controls": controls, "adaptive": adaptive, "rows": rows, "bootstrap": BOOTSTRAP,
        "target": {"tokens_saved_min": 0.60, "loss_points_max": 1.0, "verdict": verdict},
        "seconds": {**seconds, "total": round(time.time() - t0, 1)}})
    plot(rows, tiers, harness.RESULTS / f"{a.result_name}.png")
    print(f"wrote {path} and {harness.RESULTS / (a.result_name + '.png')}")


def plot(rows, tiers, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"majority@16 (plain)": ("o", "gray"), "weighted vote@16 (plain)": ("s", "C0"),
             "majority, controls + adaptive": ("D", "C1"), "weighted vote, controls + adaptive": ("*", "C3")}
    fig, axes = plt.subplots(1, len(tiers) + 1, figsize=(4.2 * (len(tiers) + 1), 4))
    for ax, tier in zip(axes, tiers + ["all"]):
        for r in (x for x in rows if x["tier"] == tier):
            marker, color = style[r["arm"]]
            ax.scatter([r["tokens"]], [100 * r["accuracy"]], marker=marker, color=color, s=80 if marker == "*" else 50,
                       label=f"{r['arm']} ({100 * r['tokens_saved']:.0f}% fewer)", zorder=5)
        harness.style_accuracy_vs_tokens(ax, tier, legend_size=6.5)
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
