"""The search StepGenerator over vLLM's async engine client (the `vllm serve` process's
`app.state.engine_client`, or any `AsyncLLM`).

Every prefix of a call becomes ONE engine request with `n` samples, submitted concurrently
(`asyncio.gather`): the scheduler batches them, children of one request share the prefix's
KV blocks, and a child's prompt is its parent's exact token ids, so with prefix caching
only the new step is prefilled (each step reports the engine's `num_cached_tokens`).

Step cutting, confidences and seeds follow `ttc_vllm.engine_offline` (same delimiter rules,
same decoding), so offline and served search see identical steps.

Limits: a trace never grows past `max_new_tokens` generated tokens (the request's
max_tokens) nor past the model's context. A trace that reached either limit is *finished*
(nothing may follow it) even though it did not end with EOS.

Cancellation: every engine request is tracked from submission to its final output; a
cancelled call (client disconnect) aborts the ones still running, and `abort_all()` aborts
whatever is left, so the KV cache is released even if a consumer swallowed the error.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Any, Sequence

from ttc_vllm.engine_offline import (
    DEFAULT_CONFIDENCE_TOP_K, Delimiter, delimiter_for, output_step, output_steps, request_usage,
    resolve_delimiter, step_sampling_kwargs,
)
from ttc_vllm.kv_ledger import GROUP_EXTRA_ARG, SEARCH_EXTRA_ARG
from ttc_vllm.search.protocols import Completion, Step, StepParams


# SamplingParams fields the step generator decides for every sub-request.
SEARCH_OWNED_PARAMS = ("n", "temperature", "top_p", "max_tokens", "stop", "stop_token_ids",
                       "include_stop_str_in_output", "logprobs", "seed", "output_kind",
                       "skip_special_tokens", "extra_args")


class EngineClientStepGenerator:
    """StepGenerator over an async engine client (`generate(prompt, sampling_params,
    request_id, **kw)` async iterator, `abort(request_id)`).

    `prompt_len`: length of the problem prompt (the root prefix); `max_new_tokens`: cap on
    the tokens generated after it per trace (None: only the context limit);
    `request_kwargs`: passed to every `generate` call (lora_request, priority, ...);
    `sampling_overrides`: extra SamplingParams fields for every sub-request (the client
    request's own top_k, penalties, ...); the fields a search controls (n, temperature,
    top_p, max_tokens, stops, logprobs, seed) are the generator's and cannot be overridden.
    """

    def __init__(self, engine_client, tokenizer, *, request_id: str, prompt_len: int,
                 max_model_len: int, max_new_tokens: int | None = None,
                 step_delimiter: str = "\n\n", seed: int | None = None,
                 confidence_top_k: int = DEFAULT_CONFIDENCE_TOP_K,
                 cache_salt: str | None = None,
                 request_kwargs: dict[str, Any] | None = None,
                 sampling_overrides: dict[str, Any] | None = None):
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        if max_model_len <= prompt_len:
            raise ValueError(f"the prompt ({prompt_len} tokens) leaves no room in the "
                             f"model's context ({max_model_len})")
        self.engine = engine_client
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.prompt_len = prompt_len
        self.max_model_len = max_model_len
        self.max_new_tokens = max_new_tokens
        self.default_delimiter = resolve_delimiter(tokenizer, step_delimiter)
        self.seed = seed
        self.confidence_top_k = confidence_top_k
        self.cache_salt = cache_salt
        self.request_kwargs = dict(request_kwargs or {})
        owned = set(SEARCH_OWNED_PARAMS) & set(sampling_overrides or {})
        if owned:
            raise ValueError(f"sampling_overrides may not set {sorted(owned)}: the search sets them")
        self.sampling_overrides = dict(sampling_overrides or {})
        self._ids = itertools.count()
        self.live: set[str] = set()  # submitted, final output not yet received
        self.requests = 0  # engine requests submitted
        self.aborted = 0  # engine requests aborted before finishing
        self.root_cached_tokens: int | None = None  # prefix-cache hit of the first request

    # -- protocol ---------------------------------------------------------------------------
    async def generate_steps(self, prefixes: Sequence[Sequence[int]], n: int,
                             params: StepParams) -> list[list[Step]]:
        delimiter = self._delimiter(params)
        outs = await self._generate_all(prefixes, n, params, delimiter, stop_at_delimiter=True)
        result = []
        for prefix, (out, room) in zip(prefixes, outs):
            if out is None:
                result.append([_exhausted_step() for _ in range(n)])
                continue
            top_k = self.confidence_top_k if params.confidence else None
            result.append([output_step(o, self._decode, _trace_ended(o, room, params),
                                       request_usage(prefix, out) if j == 0 else (0, 0), top_k)
                           for j, o in enumerate(out.outputs)])
        return result

    async def complete(self, prefixes: Sequence[Sequence[int]], n: int,
                       params: StepParams) -> list[list[Completion]]:
        delimiter = self._delimiter(params)
        outs = await self._generate_all(prefixes, n, params, delimiter, stop_at_delimiter=False)
        result = []
        for prefix, (out, room) in zip(prefixes, outs):
            if out is None:
                result.append([(_exhausted_step(),) for _ in range(n)])
                continue
            top_k = self.confidence_top_k if params.confidence else None
            result.append([output_steps(o, delimiter, self._decode, _trace_ended(o, room, params),
                                        request_usage(prefix, out) if j == 0 else (0, 0), top_k)
                           for j, o in enumerate(out.outputs)])
        return result

    async def abort_all(self) -> None:
        """Abort every engine request still running (idempotent)."""
        if not self.live:
            return
        ids = sorted(self.live)
        self.live.clear()
        self.aborted += len(ids)
        await self.engine.abort(ids)

    # -- engine requests --------------------------------------------------------------------
    def room(self, prefix: Sequence[int]) -> int:
        """Tokens this prefix may still generate (request max_tokens, model context)."""
        room = self.max_model_len - len(prefix)
        if self.max_new_tokens is not None:
            room = min(room, self.max_new_tokens - (len(prefix) - self.prompt_len))
        return room

    async def _generate_all(self, prefixes, n, params, delimiter, stop_at_delimiter):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        calls = [self._generate_one(p, n, params, delimiter, stop_at_delimiter) for p in prefixes]
        try:
            return await asyncio.gather(*calls)
        except BaseException:
            # gather cancels the siblings on cancellation, but not on another sibling's
            # error: make sure nothing keeps running (and holding KV blocks) either way.
            await asyncio.shield(self.abort_all())
            raise

    async def _generate_one(self, prefix, n, params, delimiter, stop_at_delimiter):
        room = self.room(prefix)
        if room < 1:
            return None, 0
        sp = self.sampling_params(prefix, n, params, delimiter, stop_at_delimiter,
                                  min(params.max_tokens, room))
        rid = f"{self.request_id}-ttc{next(self._ids)}"
        prompt: dict[str, Any] = {"type": "token", "prompt_token_ids": list(prefix)}
        if self.cache_salt is not None:
            prompt["cache_salt"] = self.cache_salt
        self.live.add(rid)
        self.requests += 1
        final = None
        try:
            async for out in self.engine.generate(prompt, sp, rid, **self.request_kwargs):
                final = out
        finally:
            # Cancelled mid-request: AsyncLLM aborts on GeneratorExit/CancelledError too;
            # aborting an already-finished id is a no-op, so be explicit.
            if rid in self.live:
                self.live.discard(rid)
                if final is None or not final.finished:
                    self.aborted += 1
                    await asyncio.shield(self.engine.abort(rid))
        if final is None or len(final.outputs) != n:
            raise RuntimeError(f"engine returned {0 if final is None else len(final.outputs)} "
                               f"samples for n={n} (request {rid})")
        for o in final.outputs:
            if o.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"engine request {rid} ended with {o.finish_reason!r}")
        if self.root_cached_tokens is None and len(prefix) == self.prompt_len:
            self.root_cached_tokens = int(final.num_cached_tokens or 0)
        return final, room

    def sampling_params(self, prefix: Sequence[int], n: int, params: StepParams,
                        delimiter: Delimiter, stop_at_delimiter: bool, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = dict(self.sampling_overrides)
        kwargs.update(step_sampling_kwargs(prefix, n, params, delimiter, stop_at_delimiter,
                                           max_tokens, self.confidence_top_k, self.seed),
                      output_kind=RequestOutputKind.FINAL_ONLY)
        # one KV group per search: the engine accounts the distinct blocks it holds
        kwargs["extra_args"] = {**(kwargs.get("extra_args") or {}),
                                GROUP_EXTRA_ARG: self.request_id, SEARCH_EXTRA_ARG: 1}
        return SamplingParams(**kwargs)

    # -- helpers ----------------------------------------------------------------------------
    def _delimiter(self, params: StepParams) -> Delimiter:
        return delimiter_for(self.tokenizer, self.default_delimiter, params)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _trace_ended(o, room: int, params: StepParams) -> bool:
    """EOS (a stop without a stop reason: delimiter stops carry the id or string), or a
    length cut at the trace's limit rather than at the per-call max_tokens."""
    if o.finish_reason == "stop":
        return o.stop_reason is None
    return room <= params.max_tokens


def _exhausted_step() -> Step:
    """What a prefix with no room left yields: an empty, finished step."""
    return Step((), "", True)
