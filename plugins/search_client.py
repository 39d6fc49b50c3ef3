"""Server-side search behind vLLM's own OpenAI handlers.

`SearchingEngineClient` wraps the server's engine client for the chat and completions
handlers. `generate()` of a request without `vllm_xargs.ttc_search` returns the real engine
client's generator object itself (nothing else happens on that path). For a search request
it runs `ttc_vllm.search.run_search` over an `EngineClientStepGenerator` on the real engine
client, then yields ONE finished `RequestOutput` holding the chosen trace, so vLLM's handler
builds the response as for any generation: chat template and max_tokens resolution before,
reasoning-parser split, tool parsing, usage and streaming after. Every sub-request is
aborted if the handler is cancelled (client disconnect), and the search's usage block is
handed to the middleware through `SEARCH_USAGE`.
"""
from __future__ import annotations

import contextvars
import logging
import os
from typing import Any

from ttc_vllm.answer import answer_extractor
from ttc_vllm.engine_async import EngineClientStepGenerator
from ttc_vllm.options import EXTRA_ARGS_KEY
from ttc_vllm.search import run_search
from ttc_vllm.search.options import SearchOptions
from ttc_vllm_plugins.request_rewrite import search_options_from_xargs
from ttc_vllm_plugins.response_usage import search_record

logger = logging.getLogger("ttc_vllm.plugins.search")

STEP_DELIMITER_ENV = "TTC_VLLM_STEP_DELIMITER"
THINK_START_ENV = "TTC_VLLM_THINK_START"
THINK_END_ENV = "TTC_VLLM_THINK_END"
DEFAULT_STEP_TAG = "<step>"
GENERIC_STEP_DELIMITER = "\n\n"

# Set by the middleware for the duration of one HTTP request: a list the searches of that
# request append their usage records to. Context variables follow the handler into the tasks
# vLLM spawns (cancellation watcher, streaming), so the records reach the middleware.
SEARCH_USAGE: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "ttc_search_usage", default=None)

# Sampling knobs of the client request that also shape every sampled step (the search sets
# n, temperature, top_p, max_tokens, stops and seeds itself): defaults are not copied.
INHERITED_SAMPLING = {"top_k": 0, "min_p": 0.0, "presence_penalty": 0.0,
                      "frequency_penalty": 0.0, "repetition_penalty": 1.0, "ignore_eos": False,
                      "logit_bias": None, "allowed_token_ids": None, "bad_words": None}

# generate() keyword arguments that describe the client request and apply to every
# sub-request; the reasoning-parser ones belong to the single original request.
_FORWARDED_KWARGS = ("lora_request", "trace_headers", "priority", "data_parallel_rank",
                     "session_id")


def _added_token_id(tokenizer, text: str) -> int | None:
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    if text in added:
        return int(added[text])
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def default_step_delimiter(tokenizer) -> str:
    """TTC_VLLM_STEP_DELIMITER, else the testbed's <step> when the vocabulary has it as one
    token, else a blank line (the usual step boundary of reasoning models)."""
    configured = os.environ.get(STEP_DELIMITER_ENV)
    if configured:
        return configured.encode().decode("unicode_escape")  # allow "\\n\\n" in env files
    if _added_token_id(tokenizer, DEFAULT_STEP_TAG) is not None:
        return DEFAULT_STEP_TAG
    return GENERIC_STEP_DELIMITER


def inherited_sampling(sampling_params) -> dict[str, Any]:
    """The client request's sampling knobs that differ from vLLM's defaults."""
    out = {}
    for name, default in INHERITED_SAMPLING.items():
        value = getattr(sampling_params, name, default)
        if value != default:
            out[name] = value
    return out


class SearchRunner:
    """Runs one search per engine prompt on the real engine client."""

    def __init__(self, engine_client, tokenizer, max_model_len: int, scorer=None,
                 step_delimiter: str | None = None):
        self.engine = engine_client
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.scorer = scorer
        self.step_delimiter = step_delimiter or default_step_delimiter(tokenizer)
        self.think_start = os.environ.get(THINK_START_ENV) or "<think>"
        self.think_end = os.environ.get(THINK_END_ENV) or "</think>"
        self._start_id = _added_token_id(tokenizer, self.think_start)
        self._end_id = _added_token_id(tokenizer, self.think_end)
        self.searches = 0  # started
        self.active = 0  # running now

    def thinking_open(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt leaves a thinking block open (reasoning chat templates do)."""
        if self._start_id is None:
            return False
        last_start = max((i for i, t in enumerate(prompt_ids) if t == self._start_id), default=-1)
        last_end = max((i for i, t in enumerate(prompt_ids) if t == self._end_id), default=-1)
        return last_start > last_end

    async def run(self, prompt, sampling_params, request_id: str, search: SearchOptions,
                  kwargs: dict[str, Any], controls: str | None = None):
        """Async generator: the search, then one final RequestOutput."""
        from vllm.exceptions import GenerationError, RetryableRequestError, VLLMValidationError

        prompt_ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if not prompt_ids or prompt.get("type", "token") != "token":
            raise VLLMValidationError("ttc.search needs a text or token prompt (no embeddings "
                                      "or multimodal inputs)", parameter="ttc.search")
        prompt_ids = list(prompt_ids)
        generator = EngineClientStepGenerator(
            self.engine, self.tokenizer, request_id=request_id, prompt_len=len(prompt_ids),
            max_model_len=self.max_model_len, max_new_tokens=sampling_params.max_tokens,
            step_delimiter=self.step_delimiter, seed=sampling_params.seed,
            cache_salt=prompt.get("cache_salt"),
            request_kwargs={k: kwargs[k] for k in _FORWARDED_KWARGS if kwargs.get(k) is not None},
            sampling_overrides=inherited_sampling(sampling_params))
        extract = answer_extractor(thinking_open=self.thinking_open(prompt_ids),
                                   think_end=self.think_end, think_start=self.think_start)
        self.searches += 1
        self.active += 1
        try:
            result = await run_search(prompt_ids, generator, self.scorer, search, extract,
                                      controls=controls)
        except (GenerationError, VLLMValidationError):
            raise
        except Exception as e:
            if type(e).__name__ in ("PRMUnavailableError", "PRMPoolFullError"):
                raise RetryableRequestError(f"ttc.search: the PRM is unavailable: {e}") from e
            logger.exception("ttc-vllm: search %s failed", request_id)
            raise GenerationError(f"ttc.search failed: {type(e).__name__}: {e}") from e
        finally:
            self.active -= 1
            await generator.abort_all()
        record = search_record(
            search.strategy, search.n, result.answer, len(result.candidates),
            result.accounting.as_dict(), generator.requests, generator.aborted)
        usage = SEARCH_USAGE.get()
        if usage is not None:
            usage.append(record)
        yield self.request_output(request_id, prompt, prompt_ids, result, sampling_params,
                                  generator.root_cached_tokens)

    def request_output(self, request_id, prompt, prompt_ids, result, sampling_params,
                       cached_tokens):
        from vllm.outputs import CompletionOutput, RequestOutput

        chosen = result.chosen
        token_ids = list(chosen.trace.token_ids[len(prompt_ids):]) if chosen else []
        text = self.tokenizer.decode(token_ids,
                                     skip_special_tokens=sampling_params.skip_special_tokens)
        at_limit = (len(token_ids) >= (sampling_params.max_tokens or self.max_model_len)
                    or len(prompt_ids) + len(token_ids) >= self.max_model_len)
        finish = "stop" if chosen is not None and chosen.finished and not at_limit else "length"
        output = CompletionOutput(index=0, text=text, token_ids=token_ids,
                                  cumulative_logprob=None, logprobs=None,
                                  finish_reason=finish, stop_reason=None)
        return RequestOutput(request_id=request_id, prompt=prompt.get("prompt"),
                             prompt_token_ids=prompt_ids, prompt_logprobs=None,
                             outputs=[output], finished=True,
                             num_cached_tokens=cached_tokens or 0)


class SearchingEngineClient:
    """The engine client as the chat/completions handlers see it (see module doc)."""

    def __init__(self, inner, runner: SearchRunner):
        self._inner = inner
        self._runner = runner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        search = search_options_from_xargs(getattr(sampling_params, "extra_args", None))
        if search is None:
            return self._inner.generate(prompt, sampling_params, request_id, *args, **kwargs)
        # the request's thinking controls (the middleware wrote them next to the search)
        controls = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        return self._runner.run(prompt, sampling_params, request_id, search, kwargs, controls)
