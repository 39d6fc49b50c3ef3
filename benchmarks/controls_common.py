"""What the in-engine controls benchmarks share: one engine, requests with TTC options,
per-trace measurements on testbed completions, tables and plot setup.

The controls_*.py scripts each build one engine and compare their arms side by side in the
same run (ratios, not absolute numbers, are what transfers to other machines).
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, save_figure, write_result  # noqa: E402,F401
from ttc_vllm.testbed import policy_path  # noqa: E402

TIERS = ("easy", "medium", "hard")


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


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # best effort: the process exits next anyway
        pass
