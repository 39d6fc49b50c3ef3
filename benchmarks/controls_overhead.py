"""Decode throughput with the in-engine controls active on every request vs plain requests,
through real vLLM.

    python benchmarks/controls_overhead.py [--batch 64] [--max-tokens 384] [--rounds 5] [--model DIR]
                                           [--step-backend auto|numba|compile|eager]

One engine, one run. Each round generates one batch of `--batch` requests per arm, the arms
alternating within the round (ABC, then BCA, ... so no arm always goes first), so machine
noise from other jobs hits every arm alike. Every request generates exactly `--max-tokens`
tokens (`ignore_eos=True`) and the options never end a trace early: a huge `max_think` (the
budget logic still runs every step), a halting threshold that never fires, and no answer
reserve. Arms:
  plain            no TTC options (the processor is registered but idle)
  budget           {"max_think": 10**6, "answer_reserve": 0}
  budget+halting   the same plus token-confidence halting (tail over 64 tokens, tau 1e6)
  budget+entropy   the same with the entropy signal (the costlier one: a full softmax)
Reported: generated tokens/s per arm per round, and per round the ratio to plain in the same
round; the median ratio over rounds is the number, with a 95 % bootstrap interval over rounds
(rounds are the paired units; on a shared 2-core machine one round's ratio spreads +-5-15 %,
so tens of rounds are needed to resolve a 1-3 % overhead). Also tokens per CPU-second of the engine's
process tree (less sensitive to other jobs on a shared machine than wall-clock time).

`--profile SECONDS` then samples the engine's worker process with py-spy (pip install py-spy)
for SECONDS while each arm runs again, and reports the share of the worker loop's wall time
spent inside the TTC processor (`apply` and `update_state`). The worker is on the critical
path of every synchronous decode step, so 1 - share is the throughput ratio the processor's
own work implies, resolved to a tenth of a point where the wall-clock ratios spread by
several. Writes benchmarks/results/controls_overhead.json and .png.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness

ARMS = {
    "plain": None,
    "budget": {"max_think": 10**6, "answer_reserve": 0},
    "budget+halting": {"max_think": 10**6, "answer_reserve": 0,
                       "halting": {"signal": "token_confidence", "aggregate": "tail", "window": 64,
                                   "threshold": 1e6, "direction": "above", "action": "conclude"}},
    "budget+entropy": {"max_think": 10**6, "answer_reserve": 0,
                       "halting": {"signal": "entropy", "aggregate": "tail", "window": 64,
                                   "threshold": -1e6, "direction": "below", "action": "conclude"}},
}
TARGET_ARM = "budget+halting"


def main() -> None:
    ap = harness.parser(__doc__)
    harness.add_engine_args(ap)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                    help="then sample the worker with py-spy for SECONDS per arm (see above)")
    ap.add_argument("--step-backend", default=None, choices=["auto", "numba", "compile", "eager"],
                    help="the controller step backend (TTC_VLLM_STEP; default: as set, else auto)")
    a = ap.parse_args()
    if a.step_backend:
        os.environ["TTC_VLLM_STEP"] = a.step_backend   # read by the engine's worker process
    import torch

    from ttc_vllm.control import step_backend

    backend = step_backend(torch.device("cpu"))

    from ttc_vllm.testbed.task import generate, prompt

    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    if "plain" not in arms:
        raise SystemExit("--arms must include plain (the reference)")
    t0 = time.time()
    llm = harness.make_engine(a, max_num_seqs=max(a.batch, 1))
    ids = harness.Ids.of(llm)
    prompts = [prompt(p) for p in generate("hard", a.batch, 1)]
    prm = {arm: harness.params(ARMS[arm], temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True) for arm in arms}

    def run(arm: str) -> tuple[float, int, int]:
        c = cpu_seconds()
        t = time.perf_counter()
        outs = llm.generate(prompts, prm[arm], use_tqdm=False)
        dt = time.perf_counter() - t
        cpu[arm].append(cpu_seconds() - c)
        toks = [list(o.outputs[0].token_ids) for o in outs]
        n = sum(len(x) for x in toks)
        # Both sides must do the same work: every request runs to max_tokens.
        short = sum(len(x) != a.max_tokens for x in toks)
        thinking[arm] = sum(x.index(ids.think_end) if ids.think_end in x else len(x) for x in toks) / max(n, 1)
        return n / dt, n, short

    cpu: dict[str, list[float]] = {arm: [] for arm in arms}
    thinking: dict[str, float] = {}   # share of generated tokens before `</think>` (last round)
    for arm in arms:   # warm-up round (allocations, first-touch of the controller's tensors)
        run(arm)
    tput: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu_tput: dict[str, list[float]] = {arm: [] for arm in arms}   # tokens per CPU-second of the engine
    short_total = 0
    for r in range(a.rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for arm in order:
            tps, n, short = run(arm)
            tput[arm].append(tps)
            cpu_tput[arm].append(n / cpu[arm][-1])
            short_total += short
        print(f"round {r + 1}: " + "  ".join(f"{arm} {tput[arm][-1]:.0f}" for arm in arms) + " tok/s", flush=True)
    ratios = {arm: [tput[arm][i] / tput["plain"][i] for i in range(a.rounds)] for arm in arms}
    cpu_ratios = {arm: [cpu_tput[arm][i] / cpu_tput["plain"][i] for i in range(a.rounds)] for arm in arms}
    rows = []
    for arm in arms:
        lo, hi = harness.bootstrap_interval(ratios[arm], np.median)
        rows.append(dict(arm=arm, tokens_per_s_median=statistics.median(tput[arm]),
                         tokens_per_s=tput[arm], ratio_median=statistics.median(ratios[arm]),
                         ratio_median_ci95=[lo, hi],
                         ratio_min=min(ratios[arm]), ratio_max=max(ratios[arm]), ratios=ratios[arm],
                         tokens_per_cpu_s=cpu_tput[arm], cpu_ratio_median=statistics.median(cpu_ratios[arm]),
                         cpu_ratios=cpu_ratios[arm]))
    print(f"\nbatch {a.batch}, {a.max_tokens} tokens each (ignore_eos), {a.rounds} alternating rounds, "
          f"controller step backend {backend}:")
    print(harness.table(["arm", "tok/s (median)", "ratio median", "95% interval", "ratio min", "ratio max", "CPU-time ratio"],
                   [[r["arm"], f"{r['tokens_per_s_median']:.0f}", f"{r['ratio_median']:.3f}",
                     "{:.3f}-{:.3f}".format(*r["ratio_median_ci95"]),
                     f"{r['ratio_min']:.3f}", f"{r['ratio_max']:.3f}", f"{r['cpu_ratio_median']:.3f}"] for r in rows]))
    print(f"load average after the run: {os.getloadavg()[0]:.2f} (wall-clock ratios are noisy when other jobs run; "
          "the CPU-time ratio compares tokens per CPU-second of this process tree)")
    target = next(r for r in rows if r["arm"] == TARGET_ARM) if TARGET_ARM in arms else None
    met = target is not None and target["ratio_median"] >= 0.97
    if target is not None:
        lo, hi = target["ratio_median_ci95"]
        print(f"\ntarget: {TARGET_ARM} >= 0.97x plain -> {target['ratio_median']:.3f}x "
              f"(95 % interval {lo:.3f}-{hi:.3f}): {'MET' if met else 'NOT MET'}"
              + ("" if lo >= 0.97 or not met else "; the interval reaches below 0.97: more rounds resolve it"))
    print(f"requests that did not run to max_tokens: {short_total} (must be 0)")
    print(f"share of generated tokens that are thinking (before </think>): {thinking['plain']:.1%}; "
          "the halting passes run on thinking rows only, so this share sets their cost")
    profile = {}
    if a.profile > 0:
        for arm in arms:
            profile[arm] = profile_processor_share(llm, prompts, prm[arm], a.profile)
        print(f"\nworker-loop wall time inside the TTC processor (py-spy, {a.profile:g} s per arm):")
        print(harness.table(["arm", "samples", "processor share", "implied ratio", "waiting for the scheduler"],
                       [[arm, p["samples"], f"{p['processor_share']:.2%}", f"{1 - p['processor_share']:.3f}",
                         f"{p['waiting_share']:.1%}"] for arm, p in profile.items()]))
    path = harness.write_result("controls_overhead", {
        "model": harness.model_name(a), "step_backend": backend, "batch": a.batch, "max_tokens": a.max_tokens, "rounds": a.rounds,
        "arms": {arm: ARMS[arm] for arm in arms}, "rows": rows, "short_requests": short_total,
        "profile_seconds": a.profile, "processor_profile": profile,
        "target": {"arm": TARGET_ARM, "ratio_min": 0.97, "met": met},
        "thinking_token_share": thinking, "seconds": round(time.time() - t0, 1),
        "load_average_1m_after": os.getloadavg()[0],
        "marker_ids": {"think_start": ids.think_start, "think_end": ids.think_end},
    })
    plot(rows, a, harness.RESULTS / "controls_overhead.png")
    print(f"wrote {path} and {harness.RESULTS / 'controls_overhead.png'}")
    harness.shutdown(llm)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its descendants (the engine core
    and worker processes included)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


PROCESSOR_FRAMES = ("TTCLogitsProcessor.apply", "TTCLogitsProcessor.update_state")
# the thread that runs the model: a multiprocess executor's worker loop, or the engine core's
# own loop when the model runs in it
LOOP_FRAMES = ("WorkerProc.worker_busy_loop", "EngineCoreProc.run_busy_loop")
WAITING_FRAME = "MessageQueue.dequeue"


def profile_processor_share(llm, prompts, params, seconds: float) -> dict:
    """Sample the engine's worker process with py-spy (every thread, idle ones included)
    while `params` requests run; the share of the worker loop thread's samples whose stack
    is inside the TTC processor, and inside the wait for the scheduler's next step."""
    import psutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.path.exists(spy):
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    children = psutil.Process().children(recursive=True)
    worker = next((p for p in children if "Worker" in p.name()), None) or \
        next((p for p in children if "EngineCore" in p.name()), None)
    if worker is None:
        raise SystemExit("--profile: no engine process found (in-process engine?)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "raw.txt"
        proc = subprocess.Popen([spy, "record", "-p", str(worker.pid), "-d", f"{seconds:g}", "-r", "200",
                                 "--idle", "--threads", "--nonblocking", "-f", "raw", "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            llm.generate(prompts, params, use_tqdm=False)
        if proc.returncode or not out.exists():
            raise SystemExit(f"py-spy failed (exit {proc.returncode}); on Linux it needs ptrace rights")
        total = inside = waiting = 0
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not any(f in stack for f in LOOP_FRAMES):
                continue   # other threads (zmq, the shm reader's helpers)
            n = int(count)
            total += n
            inside += n * any(f in stack for f in PROCESSOR_FRAMES)
            waiting += n * (WAITING_FRAME in stack)
    if not total:
        raise SystemExit(f"--profile: no samples of the engine loop in process {worker.pid}")
    return {"worker_pid": worker.pid, "samples": total, "processor_share": inside / total,
            "waiting_share": waiting / total}


def plot(rows, a, path) -> None:
    plt = harness.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, r in enumerate(rows):
        ax1.plot(range(1, len(r["tokens_per_s"]) + 1), r["tokens_per_s"], "o-", color=f"C{i}", label=r["arm"])
        ax2.bar(i, r["ratio_median"], color=f"C{i}")
        lo, hi = r["ratio_median_ci95"]
        ax2.errorbar(i, r["ratio_median"], yerr=[[r["ratio_median"] - lo], [hi - r["ratio_median"]]],
                     color="black", capsize=3)
    ax1.set_xlabel("round")
    ax1.set_ylabel("generated tokens/s")
    ax1.set_title(f"batch {a.batch} x {a.max_tokens} tokens")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.axhline(0.97, ls="--", color="gray", lw=0.8, label="target 0.97x")
    ax2.set_xticks(range(len(rows)))
    ax2.set_xticklabels([r["arm"] for r in rows], fontsize=7)
    ax2.set_ylim(0.9, 1.03)
    ax2.set_ylabel("throughput / plain (median, 95 % interval)")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3, axis="y")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
