"""Loss curves of the shipped testbed models, from the training.json files next to the weights.

    python benchmarks/plot_training.py   -> benchmarks/results/testbed_training.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness


def main() -> None:
    harness.parser(__doc__).parse_args()
    from ttc_vllm.testbed import WEIGHTS

    fig, ax = harness.pyplot().subplots(figsize=(6.4, 3.8))
    offset = 0
    for model in ("policy", "prm"):
        path = WEIGHTS / model / "training.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        curves = rec.get("curves") or {"train": rec.get("curve", [])}
        offset = 0
        for phase, curve in curves.items():
            if not curve:
                continue
            xs = [offset + c["step"] for c in curve]
            ax.plot(xs, [c["loss"] for c in curve], label=f"{model} {phase}")
            offset = xs[-1]
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (log)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    harness.RESULTS.mkdir(exist_ok=True)
    fig.savefig(harness.RESULTS / "testbed_training.png", dpi=110)
    print(f"wrote {harness.RESULTS / 'testbed_training.png'}")


if __name__ == "__main__":
    main()
