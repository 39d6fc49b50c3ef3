"""The sampling controller: test-time compute over vLLM's OpenAI API.

Mechanism, and why:
- Loaded as a `vllm.endpoint_plugins` entry point (named in VLLM_PLUGINS): the official,
  opt-in hook that runs in the API process, and whose `init_state` receives the engine
  client at start-up, so the PRM is built and the handlers are wrapped before the first
  request.
- It does NOT replace the `/v1/chat/completions` and `/v1/completions` routes. A replacing
  route would have to re-implement vLLM's route functions (validation, cancellation
  watcher, load tracking, SSE keep-alive, metrics headers) and every future change to them,
  and requests without `ttc` would no longer take vLLM's own path.
- Instead `attach_router` installs a pure ASGI middleware (`TTCControllerMiddleware`). It
  reads the body of POSTs to those two paths; a body without TTC options is replayed
  byte-for-byte to vLLM. A body with options is validated (400 naming the field on
  error) and rewritten so the options travel in `vllm_xargs`; vLLM's own handler then
  serves it, so streaming, parsers and errors work unchanged. (An `@app.middleware("http")`
  function cannot do this: BaseHTTPMiddleware does not let the rewritten body reach the
  route, and it buffers streams.)
- Search requests go through vLLM's handler too: `init_state` wraps the engine client of
  the chat and completions handlers (`SearchingEngineClient`), whose `generate` runs the
  search for requests carrying `vllm_xargs.ttc_search` and passes every other call
  straight to the real client.

The middleware class also works alone (`vllm serve ... --middleware
ttc_vllm_plugins.controller.TTCControllerMiddleware`): it then installs the controller
lazily from `app.state` on the first TTC request. That path runs outside vLLM's API-key
middleware for 400 answers, so the endpoint plugin is the recommended one.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
from typing import Any

from ttc_vllm import metrics
from ttc_vllm.limits import env_positive_int
from ttc_vllm_plugins import vllm_compat
from ttc_vllm_plugins.request_rewrite import (
    DEFAULT_MAX_SEARCH_WORK, PASS, SEARCH_XARG, TTC_FIELD, XARGS_FIELD, RequestRejected,
    ServerLimits, carries_ttc, error_body, might_carry_ttc, parse_body, plan_request,
)
from ttc_vllm_plugins.engine_records import REQUEST_RECORDS, RecordingEngineClient
from ttc_vllm_plugins.response_usage import (
    SSEUsageInjector, add_to_json, controls_block, kv_summary, usage_block,
)
from ttc_vllm_plugins.search_client import SEARCH_USAGE, SearchingEngineClient, SearchRunner

logger = logging.getLogger("ttc_vllm.plugins.controller")

PLUGIN_NAME = "ttc_sampling_controller"
# /invocations (SageMaker) dispatches a chat or completion body to the same handlers.
CONTROLLED_PATHS = ("/v1/chat/completions", "/v1/completions", "/invocations")
# Generation endpoints that cannot serve TTC options: a `ttc` there is refused, not ignored.
UNSUPPORTED_PATHS = ("/v1/responses", "/v1/messages", "/v1/chat/completions/batch",
                     "/inference/v1/generate")
MAP_EFFORT_ENV = "TTC_VLLM_MAP_REASONING_EFFORT"
# Start-up limits (read once; a malformed value stops the server with a message naming it).
MAX_SEARCH_WORK_ENV = "TTC_VLLM_MAX_SEARCH_WORK"
MAX_CONCURRENT_SEARCHES_ENV = "TTC_VLLM_MAX_CONCURRENT_SEARCHES"
MAX_BODY_BYTES_ENV = "TTC_VLLM_MAX_BODY_BYTES"
DEFAULT_MAX_CONCURRENT_SEARCHES = 16
DEFAULT_MAX_BODY_BYTES = 64 << 20   # the body of every POST to the two paths is buffered
RETRY_AFTER_S = 1


class SearchAdmission:
    """The server-wide cap on searches in flight in this API process (one event loop, so a
    plain counter): past it a search is answered 429 with Retry-After."""

    def __init__(self, limit: int = DEFAULT_MAX_CONCURRENT_SEARCHES):
        self.limit = limit
        self.running = 0

    def try_enter(self) -> bool:
        if self.running >= self.limit:
            return False
        self.running += 1
        return True

    def leave(self) -> None:
        self.running -= 1


class SamplingController:
    """What the middleware needs at request time: the server's limits and the search runner."""

    def __init__(self, runner: SearchRunner | None, map_reasoning_effort: bool = True,
                 max_search_work: int = DEFAULT_MAX_SEARCH_WORK,
                 max_concurrent_searches: int = DEFAULT_MAX_CONCURRENT_SEARCHES,
                 model: str = ""):
        self.runner = runner
        self.model = model   # the served model name: the metrics' model_name label
        encode = None
        if runner is not None:
            tokenizer = runner.tokenizer
            # conclusions and answer prefixes repeat across requests: encode each once
            encode = functools.lru_cache(maxsize=256)(
                lambda text: tuple(tokenizer.encode(text, add_special_tokens=False)))
        self.limits = ServerLimits(
            has_prm=runner is not None and runner.scorer is not None,
            search_enabled=runner is not None, map_reasoning_effort=map_reasoning_effort,
            max_model_len=runner.max_model_len if runner is not None else None,
            max_search_work=max_search_work, encode=encode)
        self.searches = SearchAdmission(max_concurrent_searches)

    @classmethod
    def install(cls, state, engine_client=None, scorer=None) -> "SamplingController":
        """Wrap the chat/completions handlers' engine client (idempotent) and keep the
        controller on `state.ttc_controller`."""
        from ttc_vllm_plugins.prm_config import scorer_from_env

        existing = getattr(state, "ttc_controller", None)
        if existing is not None:
            return existing
        engine_client = engine_client or getattr(state, "engine_client", None)
        map_effort = os.environ.get(MAP_EFFORT_ENV, "1").lower() not in ("0", "false", "no")
        work = env_positive_int(MAX_SEARCH_WORK_ENV, DEFAULT_MAX_SEARCH_WORK)
        concurrent = env_positive_int(MAX_CONCURRENT_SEARCHES_ENV, DEFAULT_MAX_CONCURRENT_SEARCHES)
        runner = None
        model = ""
        if engine_client is not None:
            model = vllm_compat.served_model_name(engine_client)
            # every engine request of the handlers and of searches: records taken, observed
            engine_client = RecordingEngineClient(engine_client, model)
            tokenizer = vllm_compat.engine_tokenizer(engine_client)
            scorer = scorer if scorer is not None else scorer_from_env(tokenizer=tokenizer)
            max_model_len = engine_client.model_config.max_model_len
            runner = SearchRunner(engine_client, tokenizer, max_model_len, scorer)

            def wrap(client):
                if isinstance(client, SearchingEngineClient):
                    return client
                if not isinstance(client, RecordingEngineClient):
                    client = RecordingEngineClient(client, model)
                return SearchingEngineClient(client, runner)

            if vllm_compat.wrap_handler_engine_clients(state, wrap):
                logger.info("ttc-vllm sampling controller: search on (%s PRM, step delimiter %r)",
                            "with" if scorer is not None else "no", runner.step_delimiter)
            else:
                runner = None   # the handlers could not be wrapped: search is off (compat warned)
        else:
            logger.warning("ttc-vllm sampling controller: no engine client; search is off")
        controller = cls(runner, map_effort, work, concurrent, model)
        state.ttc_controller = controller
        return controller


MIDDLEWARE_PATH = "ttc_vllm_plugins.controller.TTCControllerMiddleware"


def controller_attached(app) -> bool:
    """Whether the sampling controller serves this app: added by the endpoint plugin, or
    named with --middleware (vLLM adds those after the endpoint plugins)."""
    added = any(getattr(m, "cls", None) is TTCControllerMiddleware
                for m in getattr(app, "user_middleware", ()))
    args = getattr(getattr(app, "state", None), "args", None)
    return added or MIDDLEWARE_PATH in (getattr(args, "middleware", None) or ())


class TTCSamplingControllerPlugin:
    """The `vllm.endpoint_plugins` entry point object."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        # Added before vLLM adds CORS / API-key / request-id middleware, so those wrap it.
        app.add_middleware(TTCControllerMiddleware)

    async def init_state(self, engine_client, state, args) -> None:
        SamplingController.install(state, engine_client)


_install_lock = threading.Lock()


def _controller(scope) -> SamplingController | None:
    app = scope.get("app")
    state = getattr(app, "state", None)
    if state is None:
        return None
    controller = getattr(state, "ttc_controller", None)
    if controller is None and getattr(state, "engine_client", None) is not None:
        with _install_lock:  # --middleware use: no init_state hook, install on first use
            controller = SamplingController.install(state)
    return controller


class TTCControllerMiddleware:
    """Pure ASGI middleware (see module doc); constructor takes only the app so that
    `--middleware` can build it."""

    def __init__(self, app):
        self.app = app
        self.max_body_bytes = env_positive_int(MAX_BODY_BYTES_ENV, DEFAULT_MAX_BODY_BYTES)

    async def __call__(self, scope, receive, send) -> None:
        read = await _read_post(self, scope, receive, send)
        if read is None:
            return
        path, body = read
        plan, controller = PASS, None
        if might_carry_ttc(body):
            try:
                parsed = parse_body(body)  # None: not JSON, vLLM reports it itself
                if path in UNSUPPORTED_PATHS:
                    if carries_ttc(parsed):
                        raise RequestRejected(TTC_FIELD, f"{TTC_FIELD}: not supported on {path}; "
                                                         f"send it to {' or '.join(CONTROLLED_PATHS[:2])}")
                    parsed = None
                controller = _controller(scope) if parsed is not None else None
                limits = controller.limits if controller is not None else ServerLimits(search_enabled=False)
                plan = plan_request(parsed, limits)
            except RequestRejected as err:
                logger.debug("ttc-vllm: rejected a request: %s", err.message)  # a client mistake
                metrics.observe_rejection(rejection_reason(err))
                await _send_json(send, 400, error_body(err))
                return
        if plan.kind == "pass":
            await self.app(scope, _replay(body, receive), send)
            return
        model = controller.model if controller is not None else ""
        if plan.options is not None:
            metrics.observe_effort(model, plan.options.reasoning_effort)
        new_body = json.dumps(plan.body, separators=(",", ":")).encode()
        scope = _with_content_length(scope, len(new_body))
        usage = Usage()
        records_token = REQUEST_RECORDS.set(usage.engine)
        try:
            if plan.kind == "single":
                await self.app(scope, _replay(new_body, receive), _UsageSender(send, usage))
                return
            if not controller.searches.try_enter():
                metrics.observe_rejection("too_many_searches")
                await _send_json(send, 429, _error(
                    None, f"{controller.searches.limit} searches are running on this server, its "
                          f"limit (set by {MAX_CONCURRENT_SEARCHES_ENV}); retry later",
                    429, "RateLimitError"), retry_after=RETRY_AFTER_S)
                return
            search_token = SEARCH_USAGE.set(usage.searches)
            try:
                await self.app(scope, _replay(new_body, receive), _UsageSender(send, usage))
            finally:
                SEARCH_USAGE.reset(search_token)
                controller.searches.leave()
                if controller.searches.running == 0:
                    metrics.searches_kv_blocks.labels(model).set(0)
                usage.observe_searches(model)
        finally:
            REQUEST_RECORDS.reset(records_token)


def rejection_reason(err: RequestRejected) -> str:
    """The `reason` label of a refused request (ttc_vllm/metrics.py REJECTIONS)."""
    if MAX_SEARCH_WORK_ENV in err.message:
        return "too_much_work"
    if "not supported on" in err.message:
        return "unsupported_endpoint"
    if "not available on this server" in err.message:
        return "search_unavailable"
    return "invalid_option"


class Usage:
    """What one HTTP request's engine requests and searches reported, and its usage block."""

    def __init__(self):
        self.engine: list[dict[str, Any]] = []     # engine records (engine_records.py)
        self.searches: list[dict[str, Any]] = []   # search records (search_client.py)

    def block(self) -> tuple[dict[str, Any] | None, int | None]:
        """(the `ttc` block, thinking tokens for OpenAI's reasoning_tokens or None)."""
        if self.searches:
            block = usage_block(self.searches)
            kv = kv_summary([r for r in self.engine if r.get("kind") == "search"])
            if block is not None and kv is not None:
                block["kv"] = kv
            return block, None
        block = controls_block(self.engine)
        return block, block["thinking_tokens"] if block is not None else None

    def observe_searches(self, model: str) -> None:
        kv = kv_summary([r for r in self.engine if r.get("kind") == "search"])
        for record in self.searches:
            metrics.observe_search(model, record, kv if len(self.searches) == 1 else None)


ENABLE_HINT = ("start the server with `ttc-vllm serve`, or name ttc_sampling_controller in "
               "VLLM_PLUGINS (vLLM loads endpoint plugins only when they are allowlisted)")


class TTCNotEnabledMiddleware:
    """What plain `vllm serve` runs when ttc-vllm is installed but its endpoint plugin is
    not allowlisted (ttc_vllm_plugins.register installs it): a `ttc` body field -- or the
    reserved `vllm_xargs.ttc_search` -- is refused with a 400 that says how to enable it,
    instead of being ignored. Everything else passes untouched; `vllm_xargs.ttc` still
    reaches the logits processor, which vLLM always loads and which validates it."""

    def __init__(self, app):
        self.app = app
        self.max_body_bytes = env_positive_int(MAX_BODY_BYTES_ENV, DEFAULT_MAX_BODY_BYTES)

    async def __call__(self, scope, receive, send) -> None:
        read = await _read_post(self, scope, receive, send)
        if read is None:
            return
        path, body = read
        if might_carry_ttc(body) and _asks_for_unserved_ttc(body):
            metrics.observe_rejection("not_enabled")
            await _send_json(send, 400, error_body(RequestRejected(
                TTC_FIELD, f"{TTC_FIELD}: test-time-compute options are not enabled on this "
                           f"server; {ENABLE_HINT}")))
            return
        await self.app(scope, _replay(body, receive), send)


def _asks_for_unserved_ttc(body: bytes) -> bool:
    try:
        parsed = parse_body(body)
    except RequestRejected:
        return False   # not JSON Python can read: vLLM answers it
    if not isinstance(parsed, dict):
        return False
    xargs = parsed.get(XARGS_FIELD)
    return parsed.get(TTC_FIELD) is not None or (isinstance(xargs, dict) and SEARCH_XARG in xargs)


async def _read_post(middleware, scope, receive, send) -> tuple[str, bytes] | None:
    """(path, whole body) of a POST to a path the middlewares read; None when the request
    was passed on untouched (another method or path) or already answered."""
    path = _route_path(scope)
    if scope["type"] != "http" or scope.get("method") != "POST" \
            or (path not in CONTROLLED_PATHS and path not in UNSUPPORTED_PATHS):
        await middleware.app(scope, receive, send)
        return None
    body = await _read_bounded(receive, send, scope, middleware.max_body_bytes)
    return None if body is None else (path, body)


async def _read_bounded(receive, send, scope, max_bytes: int) -> bytes | None:
    """The whole body, or None when the client left or the body was too large (answered
    with a 413)."""
    body, status = await _read_body(receive, scope, max_bytes)
    if status == "disconnected":
        return None
    if status == "too_large":
        # The rest of the body is not read: the connection cannot be reused.
        metrics.observe_rejection("body_too_large")
        await _send_json(send, 413, _error(
            "body", f"body: larger than this server's limit of {max_bytes} bytes "
                    f"(set by {MAX_BODY_BYTES_ENV})", 413, "RequestEntityTooLarge"), close=True)
        return None
    return body


def _route_path(scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def _read_body(receive, scope, max_bytes: int) -> tuple[bytes, str]:
    """(body, "ok" | "disconnected" | "too_large"); stops reading past `max_bytes`."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length" and value.isdigit() and int(value) > max_bytes:
            return b"", "too_large"
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", "disconnected"
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            return b"", "too_large"
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), "ok"


def _replay(body: bytes, receive):
    """A receive() that yields the (possibly rewritten) body once, then the real messages
    (so disconnects still reach vLLM's cancellation watcher)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_content_length(scope, length: int):
    headers = [(k, v) for k, v in scope["headers"]
               if k.lower() not in (b"content-length", b"transfer-encoding")]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "headers": headers}


def _error(param: str | None, message: str, code: int, kind: str) -> dict[str, Any]:
    """OpenAI error format, as vLLM writes it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def _send_json(send, status: int, payload: dict[str, Any], close: bool = False,
                     retry_after: int | None = None) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _UsageSender:
    """Wraps send() of a request with ttc options: adds the `ttc` block to a 200 JSON body
    (buffered, content-length fixed) or to the last data event of an SSE stream."""

    def __init__(self, send, usage: Usage):
        self.send = send
        self.usage = usage
        self.mode: str | None = None  # "json" | "sse" | "raw"
        self.start: dict[str, Any] | None = None
        self.buffer: list[bytes] = []
        self.sse: SSEUsageInjector | None = None

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            content_type = dict((k.lower(), v) for k, v in message.get("headers", [])).get(
                b"content-type", b"")
            if message["status"] == 200 and content_type.startswith(b"application/json"):
                self.mode, self.start = "json", message
                return
            if message["status"] == 200 and content_type.startswith(b"text/event-stream"):
                self.mode = "sse"
                self.sse = SSEUsageInjector(self.usage.block)
            else:
                self.mode = "raw"
            await self.send(message)
            return
        if message["type"] != "http.response.body" or self.mode == "raw":
            await self.send(message)
            return
        more = message.get("more_body", False)
        if self.mode == "sse":
            out = self.sse.feed(message.get("body", b""))
            if not more:
                out += self.sse.close()
            if out or not more:
                await self.send({"type": "http.response.body", "body": out, "more_body": more})
            return
        self.buffer.append(message.get("body", b""))
        if more:
            return
        body = b"".join(self.buffer)
        block, reasoning_tokens = self.usage.block()
        if block is not None:
            body = add_to_json(body, block, reasoning_tokens)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
