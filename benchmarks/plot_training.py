"""Loss curves of the shipped testbed models, from the training.json files next to the weights.

    python benchmarks/plot_training.py   -> benchmarks/results/testbed_training.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS  # noqa: E402


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ttc_vllm.testbed import WEIGHTS

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
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
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "testbed_training.png", dpi=110)
    print(f"wrote {RESULTS / 'testbed_training.png'}")


if __name__ == "__main__":
    main()
