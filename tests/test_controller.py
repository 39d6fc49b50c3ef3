"""The sampling controller without a server: request parsing/validation/rewriting, the ttc
usage block in JSON and SSE responses, the ASGI middleware over a fake app, answers."""
from __future__ import annotations

import asyncio
import json
import random

import pytest

from tests.ttc_malformed_cases import CONTEXT_CASES, MALFORMED_CASES
from ttc_vllm.answer import answer_extractor, compile_answer_regex, extract_final_answer
from ttc_vllm.options import TTCOptions
from ttc_vllm.search.options import SearchOptions
from ttc_vllm_plugins.request_rewrite import (
    MAX_TTC_DEPTH, RequestRejected, ServerLimits, error_body, might_carry_ttc, parse_body,
    plan_request, search_options_from_xargs,
)
from ttc_vllm_plugins.controller import SearchAdmission
from ttc_vllm_plugins.response_usage import (
    SSEUsageInjector, add_to_json, search_record, usage_block,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "3+4=?"}]}
WITH_PRM = ServerLimits(has_prm=True)


def plan(fields, limits=ServerLimits()):
    return plan_request({**CHAT, **fields}, limits)


# -- pass-through -----------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    CHAT, {**CHAT, "ttc": None}, {**CHAT, "vllm_xargs": {"other": "x"}}, [1, 2], "text", None,
    {**CHAT, "reasoning_effort": 7},  # vLLM rejects this itself, with its own message
])
def test_requests_without_options_pass_untouched(body):
    assert plan_request(body).kind == "pass"


def test_effort_mapping_can_be_switched_off():
    assert plan({"reasoning_effort": "low"}, ServerLimits(map_reasoning_effort=False)).kind == "pass"


def test_marker_scan_only_skips_bodies_that_cannot_carry_options():
    assert not might_carry_ttc(json.dumps(CHAT).encode())
    assert might_carry_ttc(b'{"ttc": {}}')
    assert might_carry_ttc(b'{"reasoning_effort": "low"}')
    escaped = b'{"\\u0074tc": {"max_think": 3}}'  # "ttc" spelled with a JSON escape
    assert might_carry_ttc(escaped) and plan_request(json.loads(escaped)).kind == "single"


# -- single-trace controls ------------------------------------------------------------------

def test_single_trace_options_move_to_vllm_xargs_and_round_trip():
    p = plan({"ttc": {"max_think": 40, "min_think": 8, "halting": {"threshold": 1.5}},
              "max_tokens": 200, "vllm_xargs": {"keep": "me"}, "stream": True})
    assert p.kind == "single"
    assert "ttc" not in p.body and p.body["stream"] is True and p.body["max_tokens"] == 200
    assert p.body["vllm_xargs"]["keep"] == "me"
    decoded = TTCOptions.from_extra_args(p.body["vllm_xargs"])
    assert (decoded.max_think, decoded.min_think, decoded.halting.threshold) == (40, 8, 1.5)


def test_options_sent_in_vllm_xargs_are_validated_the_same_way():
    p = plan({"vllm_xargs": {"ttc": json.dumps({"budget_tokens": 12})}})
    assert p.kind == "single"
    assert TTCOptions.from_extra_args(p.body["vllm_xargs"]).max_think == 12
    with pytest.raises(RequestRejected) as e:
        plan({"vllm_xargs": {"ttc": json.dumps({"max_think": -2})}})
    assert e.value.param == "vllm_xargs.ttc.max_think"


@pytest.mark.parametrize("sent,level", [("low", "low"), ("none", "none"), ("high", "high"),
                                        ("minimal", "low"), ("xhigh", "high"), ("max", "high")])
def test_top_level_reasoning_effort_becomes_the_budget_level(sent, level):
    p = plan({"reasoning_effort": sent})
    assert p.kind == "single" and p.body["reasoning_effort"] == sent  # chat template still sees it
    assert TTCOptions.from_extra_args(p.body["vllm_xargs"]).reasoning_effort == level


def test_explicit_budget_wins_over_top_level_effort_and_same_effort_is_no_conflict():
    assert TTCOptions.from_extra_args(
        plan({"reasoning_effort": "high", "ttc": {"max_think": 7}}).body["vllm_xargs"]
    ).reasoning_effort is None
    p = plan({"reasoning_effort": "minimal", "ttc": {"reasoning_effort": "low"}})
    assert TTCOptions.from_extra_args(p.body["vllm_xargs"]).reasoning_effort == "low"


def test_budget_equal_to_max_tokens_is_allowed_but_one_more_is_not():
    assert plan({"ttc": {"max_think": 64}, "max_tokens": 64}).kind == "single"
    with pytest.raises(RequestRejected) as e:
        plan({"ttc": {"budget_tokens": 65}, "max_tokens": 64})
    assert e.value.param == "ttc.budget_tokens"


# -- search ---------------------------------------------------------------------------------

def test_majority_needs_no_prm_and_travels_as_search_xarg():
    p = plan({"ttc": {"search": {"strategy": "majority", "n": 5}}, "n": 1, "stream": True})
    assert p.kind == "search" and p.search.n == 5
    assert "ttc" not in p.body["vllm_xargs"]  # never reaches the logits processor
    assert search_options_from_xargs(p.body["vllm_xargs"]) == p.search


@pytest.mark.parametrize("strategy", ["best_of_n", "weighted_vote", "beam", "dvts", "mcts"])
def test_prm_strategies_need_a_configured_prm(strategy):
    options = {"ttc": {"search": {"strategy": strategy, "n": 4, "beam_width": 2}}}
    with pytest.raises(RequestRejected) as e:
        plan(options)
    assert e.value.param == "ttc.search.strategy" and "TTC_VLLM_PRM" in e.value.message
    assert plan(options, WITH_PRM).search.strategy == strategy


def test_majority_with_prm_truncation_needs_the_prm():
    options = {"ttc": {"search": {"strategy": "majority", "truncate": {"by": "prm"}}}}
    with pytest.raises(RequestRejected):
        plan(options)
    assert plan({"ttc": {"search": {"strategy": "majority", "truncate": {"by": "confidence"}}}}).kind == "search"


def test_search_refused_when_the_server_cannot_search():
    with pytest.raises(RequestRejected) as e:
        plan({"ttc": {"search": {"strategy": "majority"}}}, ServerLimits(search_enabled=False))
    assert e.value.param == "ttc.search"


def test_search_ceiling_follows_the_environment(monkeypatch):
    monkeypatch.setenv("TTC_VLLM_MAX_N", "4")
    assert plan({"ttc": {"search": {"strategy": "majority", "n": 4}}}).kind == "search"
    with pytest.raises(RequestRejected) as e:
        plan({"ttc": {"search": {"strategy": "majority", "n": 5}}})
    assert e.value.param == "ttc.search.n" and "limit of 4" in e.value.message


@pytest.mark.parametrize("field,value,ok", [("logprobs", False, True), ("logprobs", 0, False),
                                            ("top_logprobs", 0, True), ("top_logprobs", 2, False),
                                            ("echo", True, False), ("use_beam_search", True, False)])
def test_search_incompatible_fields(field, value, ok):
    fields = {"ttc": {"search": {"strategy": "majority"}}, field: value}
    if ok:
        assert plan(fields).kind == "search"
    else:
        with pytest.raises(RequestRejected) as e:
            plan(fields)
        assert e.value.param == field


# -- malformed requests: one field named each -----------------------------------------------

@pytest.mark.parametrize("case_id,fields,param", MALFORMED_CASES, ids=[c[0] for c in MALFORMED_CASES])
def test_malformed_request_names_the_field(case_id, fields, param):
    with pytest.raises(RequestRejected) as e:
        plan(fields)
    assert e.value.param == param
    assert e.value.message.startswith(param + ":")
    body = error_body(e.value)
    assert body == {"error": {"message": e.value.message, "type": "BadRequestError",
                              "param": param, "code": 400}}


@pytest.fixture(scope="module")
def server_limits():
    """What a testbed server knows: its context and its tokenizer."""
    from ttc_vllm.testbed.tokenizer import build_tokenizer

    tok = build_tokenizer()
    return ServerLimits(has_prm=True, max_model_len=1024,
                        encode=lambda text: tok.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("case_id,fields,param", CONTEXT_CASES, ids=[c[0] for c in CONTEXT_CASES])
def test_context_rules_name_the_field(case_id, fields, param, server_limits):
    with pytest.raises(RequestRejected) as e:
        plan(fields, server_limits)
    assert e.value.param == param and e.value.message.startswith(param + ":")
    # without the server's context and tokenizer the same fields pass: the rule rejected them
    assert plan(fields, WITH_PRM).kind in ("single", "search")


def test_context_rules_admit_what_fits(server_limits):
    for fields in ({"ttc": {"max_think": 24}}, {"ttc": {"max_think": 0}}, {"ttc": {"max_think": 1024}},
                   {"ttc": {"max_think": 2, "conclusion": None}},
                   {"ttc": {"answer_prefix": "Final Answer:", "answer_reserve": 13}, "max_tokens": 200},
                   {"ttc": {"answer_reserve": 62}, "max_tokens": 64}):
        assert plan(fields, server_limits).kind == "single", fields


def test_work_ceiling_counts_prompts_candidates_and_steps():
    limits = ServerLimits(has_prm=True, max_search_work=64)
    majority = {"ttc": {"search": {"strategy": "majority", "n": 16}}}
    completions = {"model": "m", "prompt": ["a", "b", "c", "d"], **majority}
    assert plan_request(completions, limits).kind == "search"          # 4 x 16 = 64
    with pytest.raises(RequestRejected) as e:
        plan_request({**completions, "prompt": ["a"] * 5}, limits)    # 80
    assert e.value.param == "ttc.search" and "80 units of work" in e.value.message
    assert plan_request({**completions, "prompt": [1, 2, 3]}, limits).kind == "search"  # one token-id prompt
    beam = {"ttc": {"search": {"strategy": "beam", "n": 8, "beam_width": 4, "max_steps": 9}}}
    with pytest.raises(RequestRejected, match="72 units"):
        plan(beam, limits)
    mcts = {"ttc": {"search": {"strategy": "mcts", "beam_width": 2, "mcts": {"rollouts": 32}}}}
    assert plan(mcts, limits).kind == "search"


def test_markers_are_quoted_keys():
    """A model whose name contains "ttc" is not parsed; a `ttc` key always is."""
    assert not might_carry_ttc(json.dumps({**CHAT, "model": "ttc-testbed"}).encode())
    assert not might_carry_ttc(b'{"messages": [{"content": "what is ttc?"}]}')
    assert might_carry_ttc(b'{"model": "m", "ttc" : {"max_think": 5}}')


def test_parse_body_refuses_what_python_cannot_parse():
    assert parse_body(b"{not json") is None and parse_body(b"\xff\xfe") is None
    with pytest.raises(RequestRejected, match="nested too deeply"):
        parse_body(b'{"ttc": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(RequestRejected, match="too many digits") as e:
        parse_body(b'{"ttc": {"max_think": ' + b"9" * 5000 + b"}}")
    assert e.value.param == "body"


def test_depth_limit_is_exact():
    nested: dict = {"x": 1}
    for _ in range(MAX_TTC_DEPTH - 1):
        nested = {"k": nested}
    with pytest.raises(RequestRejected) as e:  # allowed depth, then pydantic rejects key "k"
        plan({"ttc": nested})
    assert e.value.param == "ttc.k"
    with pytest.raises(RequestRejected) as e:
        plan({"ttc": {"k": nested}})
    assert "nested deeper" in e.value.message


# -- usage block ----------------------------------------------------------------------------

def record(answer, generated, cached, prm_calls, wall):
    accounting = {"generated_tokens": generated, "prompt_tokens": 10, "cached_prompt_tokens": cached,
                  "generator_calls": 1, "nodes_expanded": 1, "prm_calls": prm_calls,
                  "prm_traces": 2 * prm_calls, "prm_tokens": 0, "halted": 1, "wall_time_s": wall}
    return search_record("best_of_n", 4, answer, 4, accounting, engine_requests=3, aborted_requests=0)


def test_usage_block_sums_counters_and_keeps_answers_in_order():
    block = usage_block([record("7", 100, 9, 1, 0.5), record(None, 40, 0, 2, 1.25)])
    assert block["searches"] == 2 and block["answers"] == ["7", None]
    assert (block["generated_tokens"], block["cached_prompt_tokens"], block["prm_calls"],
            block["prm_traces"], block["candidates"], block["engine_requests"],
            block["halted"]) == (140, 9, 3, 6, 8, 6, 2)
    assert block["wall_time_s"] == 1.25  # concurrent searches: the longest one
    assert usage_block([]) is None


def test_add_to_json_adds_the_block_and_leaves_other_bodies_alone():
    out = json.loads(add_to_json(b'{"id":"x","usage":{"total_tokens":3}}', {"searches": 1}))
    assert out == {"id": "x", "usage": {"total_tokens": 3}, "ttc": {"searches": 1}}
    assert add_to_json(b"[1,2]", {"a": 1}) == b"[1,2]"
    assert add_to_json(b"not json", {"a": 1}) == b"not json"


def sse_stream():
    events = [{"id": "c", "choices": [{"delta": {"role": "assistant"}}]},
              {"id": "c", "choices": [{"delta": {"content": "Answer: 7"}}]},
              {"id": "c", "choices": [], "usage": {"total_tokens": 9}}]
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def parse_sse(raw: bytes):
    events = [e for e in raw.split(b"\n\n") if e]
    return [None if e == b"data: [DONE]" else json.loads(e[len(b"data: "):]) for e in events]


@pytest.mark.parametrize("seed", range(6))
def test_sse_injection_targets_the_last_event_whatever_the_chunking(seed):
    raw = sse_stream()
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(raw)), 5))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    injector = SSEUsageInjector(lambda: ({"searches": 1}, None))
    out = b"".join(injector.feed(p) for p in pieces) + injector.close()
    events = parse_sse(out)
    assert events[-1] is None and events[-2]["ttc"] == {"searches": 1}
    assert events[-2]["usage"] == {"total_tokens": 9}
    assert [e for e in events[:-2]] == parse_sse(raw)[:-2]  # untouched


def test_sse_without_done_is_passed_through_unchanged():
    raw = sse_stream().replace(b"data: [DONE]\n\n", b"")
    injector = SSEUsageInjector(lambda: ({"searches": 1}, None))
    assert injector.feed(raw) + injector.close() == raw


# -- answers --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,open_,expected", [
    ("\n3+4=7<step>\n</think>\nAnswer: 7", True, "7"),
    ("\n3+4=7<step>\n", True, None),  # cut off while thinking: no answer
    ("\n3+4=7<step>\n", False, "3+4=7<step>"),  # no thinking at all: the last line
    ("<think>so 5</think>The result is \\boxed{\\frac{1}{2}}.", False, "\\frac{1}{2}"),
    ("<think>x</think>\n  forty   two \n\n", False, "forty two"),
    ("<think>Answer: 3</think>Answer: 4", False, "4"),  # thinking text is not the answer
    ("<think>still going", False, None),
    ("</think>\\boxed{12", True, "\\boxed{12"),  # unbalanced box: the last line instead
])
def test_extract_final_answer(text, open_, expected):
    assert extract_final_answer(text, thinking_open=open_) == expected


def test_configured_answer_regex():
    extract = answer_extractor(thinking_open=True, pattern=r"#### (\d+)")
    assert extract("x</think>foo #### 12 and #### 13") == "13"
    assert extract("x</think>nothing") is None
    with pytest.raises(ValueError, match="capture group"):
        compile_answer_regex(r"\d+")
    with pytest.raises(ValueError, match="invalid"):
        compile_answer_regex(r"(")


# -- the middleware over a fake ASGI app ----------------------------------------------------

class FakeController:
    def __init__(self, limits, max_searches: int = 16):
        self.limits = limits
        self.searches = SearchAdmission(max_searches)
        self.model = "fake-model"


class FakeState:
    def __init__(self, controller):
        self.ttc_controller = controller


class FakeApp:
    """Records what reached it; answers like vLLM would (JSON or SSE)."""

    def __init__(self, stream: bool = False, records=None):
        self.state = FakeState(FakeController(WITH_PRM))
        self.seen: list[tuple[dict, bytes]] = []
        self.stream = stream
        self.records = records

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.seen.append((scope, body))
        from ttc_vllm_plugins.search_client import SEARCH_USAGE

        usage = SEARCH_USAGE.get()
        if usage is not None:  # what the search wrapper does inside vLLM's handler
            usage.append(record("7", 50, 5, 1, 0.1))
        if self.stream:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            raw = sse_stream()
            for i in range(0, len(raw), 17):
                await send({"type": "http.response.body", "body": raw[i:i + 17], "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        payload = b'{"id":"x","choices":[]}'
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


async def serve_once(middleware, app, body: bytes, path="/v1/chat/completions", chunks=1) -> list[dict]:
    """One POST through the middleware, its body in `chunks` messages; what it sent back."""
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "app": app,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    size = max(1, len(body) // chunks)
    parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    incoming = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
                for i, p in enumerate(parts)]
    sent = []

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    await middleware(scope, receive, send)
    return sent


def call(app, body: bytes, path="/v1/chat/completions", chunks=3):
    from ttc_vllm_plugins.controller import TTCControllerMiddleware

    sent = asyncio.run(serve_once(TTCControllerMiddleware(app), app, body, path, chunks))
    start = next(m for m in sent if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start, out


def test_middleware_passes_plain_requests_byte_for_byte():
    app = FakeApp()
    raw = json.dumps({**CHAT, "temperature": 0.5}).encode()
    start, _ = call(app, raw)
    assert start["status"] == 200 and app.seen[0][1] == raw
    assert app.seen[0][0]["headers"][1] == (b"content-length", str(len(raw)).encode())


def test_middleware_ignores_other_paths_and_methods():
    app = FakeApp()
    raw = json.dumps({**CHAT, "ttc": {"max_think": -1}}).encode()
    start, _ = call(app, raw, path="/v1/embeddings")
    assert start["status"] == 200 and app.seen[0][1] == raw


def test_middleware_rejects_with_openai_error_and_never_calls_vllm():
    app = FakeApp()
    start, out = call(app, json.dumps({**CHAT, "ttc": {"max_think": -1}}).encode())
    assert start["status"] == 400 and app.seen == []
    err = json.loads(out)["error"]
    assert err["param"] == "ttc.max_think" and err["code"] == 400
    assert err["message"] == "ttc.max_think: Input should be greater than or equal to 0"


def test_middleware_rewrites_single_trace_requests_with_a_correct_length():
    app = FakeApp()
    call(app, json.dumps({**CHAT, "ttc": {"max_think": 9}}).encode())
    scope, body = app.seen[0]
    headers = dict(scope["headers"])
    assert int(headers[b"content-length"]) == len(body)
    assert TTCOptions.from_extra_args(json.loads(body)["vllm_xargs"]).max_think == 9


def test_middleware_adds_the_usage_block_to_search_json():
    app = FakeApp()
    start, out = call(app, json.dumps({**CHAT, "ttc": {"search": {"strategy": "majority"}}}).encode())
    data = json.loads(out)
    assert data["ttc"]["answers"] == ["7"] and data["ttc"]["generated_tokens"] == 50
    assert int(dict(start["headers"])[b"content-length"]) == len(out)
    assert json.loads(app.seen[0][1])["vllm_xargs"]["ttc_search"]


def test_middleware_adds_the_usage_block_to_search_streams():
    app = FakeApp(stream=True)
    _, out = call(app, json.dumps({**CHAT, "stream": True,
                                   "ttc": {"search": {"strategy": "majority"}}}).encode())
    events = parse_sse(out)
    assert events[-1] is None and events[-2]["ttc"]["answers"] == ["7"]
    assert all("ttc" not in e for e in events[:-2])


def test_middleware_leaves_non_search_streams_alone():
    app = FakeApp(stream=True)
    _, out = call(app, json.dumps({**CHAT, "stream": True, "ttc": {"max_think": 3}}).encode())
    assert out == sse_stream()


def test_search_options_from_xargs():
    assert search_options_from_xargs(None) is None
    assert search_options_from_xargs({"ttc": "{}"}) is None
    s = SearchOptions(strategy="beam", n=4, beam_width=2)
    assert search_options_from_xargs({"ttc_search": s.model_dump_json()}) == s


def test_thinking_controls_travel_with_a_search_to_every_sample():
    """Every TTCOptions field but the search itself reaches the search's engine requests
    (vllm_xargs.ttc, read by the search wrapper): nothing a search request sends is ignored."""
    controls = {"max_think": 90, "min_think": 10, "answer_reserve": 8, "conclusion": "So:",
                "answer_prefix": "A:", "continuation": "Hmm", "max_extensions": 2,
                "halting": {"signal": "entropy", "threshold": -0.5}}
    assert set(TTCOptions.model_fields) - {"search", "budget_tokens", "reasoning_effort"} == set(controls)
    p = plan({"ttc": {**controls, "search": {"strategy": "majority", "n": 3}}, "max_tokens": 300})
    assert p.kind == "search" and p.search.n == 3
    sent = TTCOptions.from_extra_args(p.body["vllm_xargs"])
    assert sent.search is None
    assert sent.model_dump(include=set(controls)) == TTCOptions(**controls).model_dump(include=set(controls))
    # an effort level (top level or ttc) and the Anthropic alias travel as well
    sent = TTCOptions.from_extra_args(plan({"ttc": {"search": {"strategy": "majority"}},
                                            "reasoning_effort": "low"}).body["vllm_xargs"])
    assert sent.reasoning_effort == "low"
    sent = TTCOptions.from_extra_args(plan({"ttc": {"budget_tokens": 33, "search": {"strategy": "majority"}}})
                                      .body["vllm_xargs"])
    assert sent.max_think == 33
    # a search with no controls sends none
    assert "ttc" not in plan({"ttc": {"search": {"strategy": "majority"}}}).body["vllm_xargs"]


def test_middleware_answers_413_past_the_body_limit(monkeypatch):
    monkeypatch.setenv("TTC_VLLM_MAX_BODY_BYTES", "1000")
    app = FakeApp()
    start, out = call(app, json.dumps({**CHAT, "ttc": {"conclusion": "x" * 2000}}).encode())
    assert start["status"] == 413 and (b"connection", b"close") in start["headers"]
    assert json.loads(out)["error"]["param"] == "body" and not app.seen
    start, _ = call(app, json.dumps({**CHAT, "ttc": {"max_think": 5}}).encode())
    assert start["status"] == 200 and len(app.seen) == 1


def test_middleware_answers_its_own_400_for_unparseable_ttc_bodies():
    app = FakeApp()
    start, out = call(app, b'{"ttc": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert start["status"] == 400 and json.loads(out)["error"]["param"] == "body"
    start, out = call(app, b'{"model": "m", "ttc": {"max_think": ' + b"1" * 5000 + b"}}")
    assert start["status"] == 400 and b"too many digits" in out and not app.seen


def test_middleware_caps_concurrent_searches_with_429():
    """A second search while the first is running is a 429 with Retry-After; once the first
    ends, a search is admitted again."""
    from ttc_vllm_plugins.controller import TTCControllerMiddleware

    release = asyncio.Event()
    started = asyncio.Event()

    class SlowApp(FakeApp):
        async def __call__(self, scope, receive, send):
            started.set()
            await release.wait()
            await super().__call__(scope, receive, send)

    app = SlowApp()
    app.state.ttc_controller.searches = SearchAdmission(1)
    middleware = TTCControllerMiddleware(app)
    body = json.dumps({**CHAT, "ttc": {"search": {"strategy": "majority", "n": 2}}}).encode()

    async def request():
        return (await serve_once(middleware, app, body))[0]

    async def scenario():
        first = asyncio.create_task(request())
        await started.wait()
        second = await request()
        release.set()
        first_start = await first
        return first_start, second, await request()

    first, second, third = asyncio.run(scenario())
    assert second["status"] == 429 and (b"retry-after", b"1") in second["headers"]
    assert first["status"] == 200 and third["status"] == 200
    assert app.state.ttc_controller.searches.running == 0
