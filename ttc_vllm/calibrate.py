"""Halting-threshold calibration: warm-up traces -> tau -> a named entry in a JSON file.

The file maps names to halting settings: `{"name": {"signal": ..., "aggregate": ...,
"window": ..., "top_k": ..., "direction": ..., "min_tokens": ..., "threshold": tau, ...}}`
(extra keys such as `percentile` or `traces` record provenance). A request's
`halting.threshold` may name an entry; it is looked up in the file named by the
TTC_VLLM_CALIBRATION env var (both the API server and the engine read it).

`calibrate_main` is the `ttc-vllm calibrate` job: it samples warm-up traces of the testbed
on a held-out slice through `vllm.LLM` (with log-probs), turns each into a trace score
with the same maths the engine uses (ttc_vllm.halting) and writes the entry.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from ttc_vllm import halting as H
from ttc_vllm.testbed import policy_path

CALIBRATION_ENV = "TTC_VLLM_CALIBRATION"
CALIBRATION_SEED = 20_000  # held-out slice: training uses no tier generator, evaluation 10_000


def calibration_path(path: str | os.PathLike | None = None) -> Path | None:
    path = path if path is not None else os.environ.get(CALIBRATION_ENV)
    return Path(path) if path else None


def load_calibration(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Entries of the calibration file ({} when no file is configured). Parsed once per
    file version: admission checks every request against it."""
    p = calibration_path(path)
    if p is None:
        return {}
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ValueError(f"calibration file {p} ({CALIBRATION_ENV}) does not exist") from None
    version = (st.st_mtime_ns, st.st_size, st.st_ino)
    return {k: dict(v) for k, v in _parse_calibration(str(p), version).items()}


@lru_cache(maxsize=8)
def _parse_calibration(path: str, version: tuple) -> dict[str, dict[str, Any]]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"calibration file {p} ({CALIBRATION_ENV}) does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration file {p}: invalid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"calibration file {p}: expected an object of name -> settings")
    for name, entry in data.items():
        if not isinstance(entry.get("threshold"), (int, float)) or isinstance(entry.get("threshold"), bool):
            raise ValueError(f"calibration file {p}: entry {name!r} has no numeric threshold")
    return data


def save_calibration(path: str | os.PathLike, name: str, entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Add or replace one entry (the file's other entries are kept)."""
    p = Path(path)
    data = load_calibration(p) if p.exists() else {}
    data[name] = entry
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(p)
    return data


def calibrate_entry(traces: Sequence[Sequence[float]], *, signal: str, aggregate: str, window: int,
                    top_k: int = H.MAX_TOP_K, direction: str = "above", action: str | None = None,
                    min_tokens: int = 0, percentile: float | None = None,
                    max_loss: float | None = None, correct: Sequence[bool] | None = None) -> dict[str, Any]:
    """A calibration entry from per-token signal traces r (one list per warm-up trace).

    Exactly one of `percentile` (tau = that percentile of trace scores) or `max_loss`
    (with `correct`, see `halting.threshold_by_accuracy_loss`) picks tau.
    """
    if (percentile is None) == (max_loss is None):
        raise ValueError("give exactly one of percentile or max_loss")
    scores = [H.trace_score(H.aggregate_series(r, signal, aggregate, window), min_tokens, direction)
              for r in traces]
    if percentile is not None:
        tau = H.threshold_by_percentile(scores, percentile)
    else:
        if correct is None:
            raise ValueError("max_loss needs the correctness of each trace")
        tau = H.threshold_by_accuracy_loss(scores, correct, max_loss, direction)
    tau = H.clamp_threshold(signal, tau)   # the options reject a tau outside the range
    entry: dict[str, Any] = {
        "signal": signal, "aggregate": aggregate, "window": window, "top_k": top_k,
        "direction": direction, "min_tokens": min_tokens, "threshold": tau,
        "traces": len(traces), "scored_traces": sum(not math.isnan(s) for s in scores),
    }
    if action is not None:
        entry["action"] = action
    if percentile is not None:
        entry["percentile"] = percentile
    else:
        entry["max_loss"] = max_loss
        entry["accuracy"] = sum(map(bool, correct)) / len(correct)
    return entry


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ttc-vllm calibrate",
                                 description="Pick a halting threshold from warm-up traces")
    ap.add_argument("--name", required=True, help="calibration entry name (what requests send as threshold)")
    ap.add_argument("--out", default=os.environ.get(CALIBRATION_ENV, "ttc_calibration.json"),
                    help=f"calibration JSON file (default ${CALIBRATION_ENV} or ./ttc_calibration.json)")
    ap.add_argument("--model", default=str(policy_path()), help="policy model (default: the shipped testbed policy)")
    ap.add_argument("--tier", default="medium")
    ap.add_argument("--problems", type=int, default=16, help="warm-up problems")
    ap.add_argument("--samples", type=int, default=1, help="traces per problem")
    ap.add_argument("--seed", type=int, default=CALIBRATION_SEED)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--signal", choices=H.SIGNALS, default="token_confidence")
    ap.add_argument("--aggregate", choices=H.AGGREGATES, default="tail")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=H.MAX_TOP_K)
    ap.add_argument("--direction", choices=("above", "below"), default="above")
    ap.add_argument("--action", choices=("conclude", "stop"), default=None)
    ap.add_argument("--min-tokens", type=int, default=0)
    pick = ap.add_mutually_exclusive_group(required=True)
    pick.add_argument("--percentile", type=float)
    pick.add_argument("--max-loss", type=float, help="accuracy loss allowed, fraction of traces")
    return ap


def calibrate_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`ttc-vllm calibrate ...`: sample warm-up traces, write the entry, return it."""
    args = build_parser().parse_args(argv)
    if not 1 <= args.top_k <= H.MAX_TOP_K or args.window < 1 or args.problems < 1 or args.samples < 1:
        raise SystemExit("ttc-vllm calibrate: --top-k must be 1..20; --window, --problems, --samples >= 1")
    from vllm import SamplingParams

    from ttc_vllm.engine import make_llm
    from ttc_vllm.testbed.metrics import MarkerIds
    from ttc_vllm.testbed.task import answer_known_at, extract_answer, generate, prompt

    full_vocab = args.signal == "entropy"
    llm = make_llm(args.model, max_logprobs=-1 if full_vocab else H.MAX_TOP_K)
    tok = llm.get_tokenizer()
    ids = MarkerIds.from_tokenizer(tok)
    decode = lambda t: tok.decode(t, skip_special_tokens=False)  # noqa: E731
    problems = generate(args.tier, args.problems, args.seed)
    params = SamplingParams(temperature=args.temperature, n=args.samples, max_tokens=args.max_tokens,
                            seed=args.seed,
                            logprobs=-1 if full_vocab else (H.MAX_TOP_K if args.signal == "sampled_margin"
                                                            else args.top_k))
    outputs = llm.generate([prompt(p) for p in problems], params, use_tqdm=False)

    traces: list[list[float]] = []
    correct: list[bool] = []
    for problem, out in zip(problems, outputs):
        for o in out.outputs:
            token_ids = list(o.token_ids)
            n_think = next((i for i, t in enumerate(token_ids) if t == ids.think_end), len(token_ids))
            r = H.replay_signal(o.logprobs[:n_think], args.signal, args.top_k, token_ids)
            traces.append(r)
            ok = extract_answer(o.text) == problem.answer
            if args.direction == "above":
                # Halting early keeps the answer only if it was already stated: judge the
                # trace where its score is reached (the latest a threshold would stop it).
                f = H.aggregate_series(r, args.signal, args.aggregate, args.window)
                eligible = [(x, i) for i, x in enumerate(f) if i + 1 >= args.min_tokens and not math.isnan(x)]
                known = answer_known_at(token_ids, ids.think_end, ids.step_tag, decode, problem.answer)
                if eligible:
                    _, at = max(eligible)
                    ok = ok and known is not None and known <= at + 1
            correct.append(ok)
    entry = calibrate_entry(traces, signal=args.signal, aggregate=args.aggregate, window=args.window,
                            top_k=args.top_k, direction=args.direction, action=args.action,
                            min_tokens=args.min_tokens, percentile=args.percentile,
                            max_loss=args.max_loss, correct=correct)
    entry.update(model=str(args.model or "testbed"), tier=args.tier, seed=args.seed)
    save_calibration(args.out, args.name, entry)
    print(json.dumps({args.name: entry}, indent=2))
    return entry


if __name__ == "__main__":
    calibrate_main()
