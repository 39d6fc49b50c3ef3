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

import json
import logging
import threading
from typing import Any

from ttc_vllm_plugins.request_rewrite import (
    PASS, RequestRejected, ServerLimits, error_body, might_carry_ttc, plan_request,
)
from ttc_vllm_plugins.response_usage import SSEUsageInjector, add_to_json, usage_block
from ttc_vllm_plugins.search_client import SEARCH_USAGE, SearchingEngineClient, SearchRunner

logger = logging.getLogger("ttc_vllm.plugins.controller")

PLUGIN_NAME = "ttc_sampling_controller"
CONTROLLED_PATHS = ("/v1/chat/completions", "/v1/completions")
HANDLER_ATTRS = ("openai_serving_chat", "openai_serving_completion")
MAP_EFFORT_ENV = "TTC_VLLM_MAP_REASONING_EFFORT"


class SamplingController:
    """What the middleware needs at request time: the server's limits and the search runner."""

    def __init__(self, runner: SearchRunner | None, map_reasoning_effort: bool = True):
        self.runner = runner
        self.limits = ServerLimits(
            has_prm=runner is not None and runner.scorer is not None,
            search_enabled=runner is not None, map_reasoning_effort=map_reasoning_effort)

    @classmethod
    def install(cls, state, engine_client=None, scorer=None) -> "SamplingController":
        """Wrap the chat/completions handlers' engine client (idempotent) and keep the
        controller on `state.ttc_controller`."""
        import os

        from ttc_vllm_plugins.prm_config import scorer_from_env

        existing = getattr(state, "ttc_controller", None)
        if existing is not None:
            return existing
        engine_client = engine_client or getattr(state, "engine_client", None)
        map_effort = os.environ.get(MAP_EFFORT_ENV, "1").lower() not in ("0", "false", "no")
        runner = None
        if engine_client is not None:
            tokenizer = engine_client.renderer.tokenizer
            scorer = scorer if scorer is not None else scorer_from_env(tokenizer=tokenizer)
            max_model_len = engine_client.model_config.max_model_len
            runner = SearchRunner(engine_client, tokenizer, max_model_len, scorer)
            for attr in HANDLER_ATTRS:
                handler = getattr(state, attr, None)
                if handler is not None and not isinstance(handler.engine_client, SearchingEngineClient):
                    handler.engine_client = SearchingEngineClient(handler.engine_client, runner)
            logger.info("ttc-vllm sampling controller: search on (%s PRM, step delimiter %r)",
                        "with" if scorer is not None else "no", runner.step_delimiter)
        else:
            logger.warning("ttc-vllm sampling controller: no engine client; search is off")
        controller = cls(runner, map_effort)
        state.ttc_controller = controller
        return controller


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

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" \
                or _route_path(scope) not in CONTROLLED_PATHS:
            await self.app(scope, receive, send)
            return
        body, disconnected = await _read_body(receive)
        if disconnected:
            return
        plan = PASS
        if might_carry_ttc(body):
            try:
                parsed = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                parsed = None  # vLLM reports malformed JSON itself
            controller = _controller(scope) if parsed is not None else None
            limits = controller.limits if controller is not None else ServerLimits(search_enabled=False)
            try:
                plan = plan_request(parsed, limits)
            except RequestRejected as err:
                await _send_json(send, 400, error_body(err))
                return
        if plan.kind == "pass":
            await self.app(scope, _replay(body, receive), send)
            return
        new_body = json.dumps(plan.body, separators=(",", ":")).encode()
        scope = _with_content_length(scope, len(new_body))
        if plan.kind == "single":
            await self.app(scope, _replay(new_body, receive), send)
            return
        records: list[dict[str, Any]] = []
        token = SEARCH_USAGE.set(records)
        try:
            await self.app(scope, _replay(new_body, receive), _UsageSender(send, records))
        finally:
            SEARCH_USAGE.reset(token)


def _route_path(scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def _read_body(receive) -> tuple[bytes, bool]:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


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


async def _send_json(send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _UsageSender:
    """Wraps send() of a search request: adds the `ttc` block to a 200 JSON body (buffered,
    content-length fixed) or to the last data event of an SSE stream."""

    def __init__(self, send, records: list[dict[str, Any]]):
        self.send = send
        self.records = records
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
                self.sse = SSEUsageInjector(lambda: usage_block(self.records))
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
        block = usage_block(self.records)
        if block is not None:
            body = add_to_json(body, block)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
