"""The controller step alone, per backend: time per step at a batch of slots, no engine.

    python benchmarks/controls_step.py [--batch 64] [--vocab 272] [--steps 3000]

`ThinkingController.step` on CPU with every slot active, driven like the V1 processor drives
it (each step one new token per row, read from per-row output lists with np.fromiter), for
the three step backends (numba kernel: the CPU default; torch.compile; eager torch) and two
workloads: budget only ({"max_think": 10**6}) and budget + token-confidence halting (tail over
64 tokens, a threshold that never fires). Reported: the median over 5 repeats of the mean
time per step, with the list reading timed separately and subtracted. The engine-level
number is benchmarks/controls_overhead.py; this one isolates the controller. Writes
benchmarks/results/controls_step.json and .png.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness

BACKENDS = ("numba", "compile", "eager")
WORKLOADS = ("budget", "budget+halting")


def make(backend: str, workload: str, batch: int):
    from ttc_vllm import control as C
    from ttc_vllm import halting as H

    ctrl = C.ThinkingController(batch, C.Markers(1, 2), backend=backend)
    h = (C.HaltingParams(H.SIGNAL_TOKEN, H.AGG_TAIL, 20, 64, 1e6, True, False, 0)
         if workload == "budget+halting" else None)
    for s in range(batch):
        ctrl.add(s, C.SlotParams(think_cap=10**6, conclusion_ids=(5, 6), halting=h,
                                 phase=C.PHASE_THINKING))
    return ctrl


def time_steps(ctrl, batch: int, vocab: int, steps: int, with_step: bool) -> float:
    import torch

    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))
    slots = torch.arange(batch)
    outs = [[7] * 3 for _ in range(batch)]

    def once(i: int) -> None:
        for o in outs:
            o.append(10 + i % 200)
        last = torch.from_numpy(np.fromiter((o[-1] for o in outs), np.int64, batch))
        lens = torch.from_numpy(np.fromiter(map(len, outs), np.int64, batch))
        if with_step:
            ctrl.step(logits, slots, last, lens)

    for i in range(200):
        once(i)
    t = time.perf_counter()
    for i in range(steps):
        once(i)
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=272, help="logits per row (the testbed's 272)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(1)   # as in vLLM's CPU worker
    rows = []
    for workload in WORKLOADS:
        for backend in BACKENDS:
            ctrl = make(backend, workload, a.batch)
            reading = statistics.median(time_steps(ctrl, a.batch, a.vocab, a.steps, False)
                                        for _ in range(a.repeats))
            total = statistics.median(time_steps(ctrl, a.batch, a.vocab, a.steps, True)
                                      for _ in range(a.repeats))
            rows.append(dict(workload=workload, backend=backend, ms_per_step=round((total - reading) * 1e3, 4),
                             list_reading_ms=round(reading * 1e3, 4)))
            print(f"{workload:15s} {backend:8s} {rows[-1]['ms_per_step']:.4f} ms/step", flush=True)
    for r in rows:
        eager = next(x for x in rows if x["workload"] == r["workload"] and x["backend"] == "eager")
        r["speedup_vs_eager"] = round(eager["ms_per_step"] / r["ms_per_step"], 1)
    print(f"\nbatch {a.batch}, vocab {a.vocab}, {a.steps} steps x {a.repeats} repeats (median):")
    print(harness.table(["workload", "backend", "ms / step", "x eager"],
                   [[r["workload"], r["backend"], f"{r['ms_per_step']:.3f}", f"{r['speedup_vs_eager']:.1f}"]
                    for r in rows]))
    path = harness.write_result("controls_step", {"batch": a.batch, "vocab": a.vocab, "steps": a.steps,
                                             "repeats": a.repeats, "rows": rows})
    plot(rows, a, harness.RESULTS / "controls_step.png")
    print(f"wrote {path} and {harness.RESULTS / 'controls_step.png'}")


def plot(rows, a, path) -> None:
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.25
    for i, backend in enumerate(BACKENDS):
        ys = [next(r["ms_per_step"] for r in rows if r["workload"] == w and r["backend"] == backend)
              for w in WORKLOADS]
        ax.bar([k + (i - 1) * width for k in range(len(WORKLOADS))], ys, width, label=backend, color=f"C{i}")
    ax.set_xticks(range(len(WORKLOADS)))
    ax.set_xticklabels(WORKLOADS)
    ax.set_yscale("log")
    ax.set_ylabel("ms per controller step (log)")
    ax.set_title(f"controller step alone, batch {a.batch}, vocab {a.vocab}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
