"""What every benchmark shares: the result record (numbers + the command and commit that
made them) and where it goes."""
from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]
SERVED = "ttc-testbed"   # matches the testbed's effort table


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, data: dict) -> Path:
    """Write benchmarks/results/<name>.json with provenance; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def bootstrap_interval(values, statistic=None, resamples: int = 2000, rng=0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of `statistic` (default: the mean) of 1-D `values`.
    `rng`: a seed or a numpy Generator (shared Generators keep several intervals reproducible
    in the order they are drawn)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    draws = values[rng.integers(0, len(values), size=(resamples, len(values)))]
    stats = (statistic or np.mean)(draws, axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def save_figure(fig, path) -> None:
    """Lay out, write the PNG every benchmark writes (120 dpi), and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def style_accuracy_vs_tokens(ax, title: str) -> None:
    """The axes of an accuracy-vs-generated-tokens panel (log x, 0-100 %), with its legend."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.set_xlabel("generated tokens per problem (log)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right")


# -- a server under test ----------------------------------------------------------------

def engine_args(model: str, max_model_len: int) -> list[str]:
    return [model, "--host", "127.0.0.1", "--served-model-name", SERVED, "--enforce-eager",
            "--kv-cache-memory-bytes", str(512 << 20), "--block-size", "32",
            "--max-model-len", str(max_model_len), "--max-num-seqs", "64", "--seed", "0",
            "--reasoning-parser", "deepseek_r1", "--disable-uvicorn-access-log",
            "--uvicorn-log-level", "warning"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        with open(self.log, "wb") as sink:
            self.proc = subprocess.Popen([*argv, "--port", str(self.port)], cwd=ROOT, env=env,
                                         stdout=sink, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} not healthy after {timeout_s}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
