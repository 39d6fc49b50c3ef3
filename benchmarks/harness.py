"""The one harness every benchmark shares: arguments, the engine, testbed measurements,
statistics, tables and plots, a server under test, and the result record (numbers + the
command, commit and machine that made them) under benchmarks/results/.

A script imports it as `from benchmarks import harness` and runs both ways:
`python benchmarks/NAME.py ...` and `python -m benchmarks.NAME ...` (from the repository root).
The benchmarks build their engines in the same run for every arm they compare (ratios, not
absolute numbers, are what transfers to other machines).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttc_vllm.plots import pyplot, save_figure, style_accuracy_vs_tokens  # noqa: F401 (the benchmarks' plots)
from ttc_vllm.testbed import policy_path

# -- results ------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
# Where results go: benchmarks/results/, or $TTC_VLLM_BENCH_RESULTS (a trial run that must not
# overwrite the committed numbers).
RESULTS = Path(os.environ.get("TTC_VLLM_BENCH_RESULTS") or ROOT / "benchmarks" / "results")
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


# -- arguments ---------------------------------------------------------------------------

def parser(doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a benchmark: its module docstring as the description."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_sampling_args(ap, problems: int, k: int = 16, temperature: float = 0.8) -> None:
    """--problems (per tier), --k (samples per problem) and --temperature."""
    ap.add_argument("--problems", type=int, default=problems, help="problems per tier")
    ap.add_argument("--k", type=int, default=k, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=temperature)


TIERS = ("easy", "medium", "hard")


# -- an offline engine on the testbed policy -------------------------------------------------

def add_engine_args(ap) -> None:
    ap.add_argument("--model", default=str(policy_path()),
                    help="policy directory (default: the shipped testbed policy, ttc_vllm.testbed.policy_path())")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-mib", type=int, default=768, help="KV cache size in MiB")


def make_engine(args, **overrides):
    """One vLLM engine (make_llm: CPU defaults, block 32, len 512, TTC processor registered)."""
    from ttc_vllm.engine import make_llm

    kw = dict(max_num_seqs=args.max_num_seqs, kv_cache_memory_bytes=args.kv_mib << 20)
    kw.update(overrides)
    t0 = time.time()
    llm = make_llm(args.model, **kw)
    print(f"engine ready in {time.time() - t0:.1f}s ({args.model or 'shipped testbed policy'})", flush=True)
    return llm


def model_name(args) -> str:
    from ttc_vllm.testbed import policy_path

    return str(args.model or policy_path())


def params(ttc: dict | None = None, **kw):
    """SamplingParams with the TTC options in extra_args (None: a plain request)."""
    from vllm import SamplingParams

    extra = {"ttc": json.dumps(ttc, separators=(",", ":"))} if ttc is not None else None
    return SamplingParams(extra_args=extra, **kw)


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # best effort: the process exits next anyway
        pass


# -- testbed traces: markers and measurements ---------------------------------------------------

@dataclass(frozen=True)
class Ids:
    """Token ids of the testbed markers."""

    think_start: int
    think_end: int
    step_tag: int
    eos: int

    @classmethod
    def of(cls, llm) -> Ids:
        from ttc_vllm.testbed.task import STEP_TAG, THINK_END, THINK_START

        tok = llm.get_tokenizer()
        return cls(tok.convert_tokens_to_ids(THINK_START), tok.convert_tokens_to_ids(THINK_END),
                   tok.convert_tokens_to_ids(STEP_TAG), tok.eos_token_id)


def first_think_len(token_ids: Sequence[int], ids: Ids) -> int:
    """Tokens of the thinking block the prompt opened (up to `</think>`, or all)."""
    for i, t in enumerate(token_ids):
        if t == ids.think_end:
            return i
    return len(token_ids)


def all_think_len(token_ids: Sequence[int], ids: Ids) -> int:
    """Thinking tokens over every thinking block (a `<think>` after `</think>` reopens one):
    what a budget caps."""
    inside, n = True, 0
    for t in token_ids:
        if t == ids.think_end:
            inside = False
        elif t == ids.think_start and not inside:
            inside = True
        elif inside:
            n += 1
    return n


def answer_known_at(token_ids: Sequence[int], ids: Ids, decode, answer: int) -> int | None:
    """Thinking tokens after which a step line first states `answer` (None: never)."""
    from ttc_vllm.testbed.task import answer_known_at as known_at

    return known_at(token_ids, ids.think_end, ids.step_tag, decode, answer)


def thinking_signal(logprobs, n_think: int, signal: str, top_k: int = 20,
                    token_ids: Sequence[int] | None = None) -> list[float]:
    """Per-token signal r_t of the first `n_think` positions (`halting.replay_signal`;
    sampled_margin needs the sampled token ids)."""
    from ttc_vllm.halting import replay_signal

    return replay_signal(logprobs[:n_think], signal, top_k, token_ids)


# -- statistics and tables ----------------------------------------------------------------

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


def paired_interval(a, b, resamples: int = 2000, rng=0) -> list[float]:
    """The paired bootstrap: 95 % interval of mean(a - b) over the paired units (problems,
    rounds), in percentage points, rounded to 0.01."""
    import numpy as np

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    lo, hi = bootstrap_interval(diff, resamples=resamples, rng=rng)
    return [round(100 * lo, 2), round(100 * hi, 2)]


def pct(x: float) -> str:
    return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], widths: Sequence[int] | None = None) -> str:
    """A plain fixed-width text table (first column left-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = widths or [max(len(r[i]) for r in cells) + 2 for i in range(len(headers))]
    out = []
    for j, r in enumerate(cells):
        out.append("".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("-" * sum(widths))
    return "\n".join(out)


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
