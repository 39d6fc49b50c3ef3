"""The sampling controller in a real `ttc-vllm serve` process, through the real `openai`
client, on loopback. ONE server per session (tests/live_server.py: the testbed policy, the
DeepSeek-R1 reasoning parser -- the testbed's <think>/</think> are single tokens -- and the
deterministic fake PRM, so every strategy is reachable).
"""
from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest

from tests.live_server import BLOCK, EASY, HARD, ROOT, SERVED_NAME
from tests.ttc_malformed_cases import MALFORMED_CASES

openai = pytest.importorskip("openai")
from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

pytestmark = pytest.mark.server


@pytest.fixture(scope="session")
def testbed_tokenizer():
    from ttc_vllm.testbed.tokenizer import build_tokenizer

    return build_tokenizer()


def chat(question: str):
    return [{"role": "user", "content": question}]


def reasoning_of(message) -> str:
    extra = message.model_extra or {}
    return extra.get("reasoning") or extra.get("reasoning_content") or ""


def raw_chat(client, **kwargs) -> tuple[ChatCompletion, dict]:
    raw = client.chat.completions.with_raw_response.create(model=SERVED_NAME, **kwargs)
    data = raw.http_response.json()
    return ChatCompletion.model_validate(data), data  # strict validation, not construct()


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


# -- requests without ttc ---------------------------------------------------------------------

def test_plain_requests_take_vllms_path(client, server):
    first, data = raw_chat(client, messages=chat(EASY), max_tokens=120, temperature=0,
                           extra_body={"return_token_ids": True})
    second, _ = raw_chat(client, messages=chat(EASY), max_tokens=120, temperature=0,
                         extra_body={"return_token_ids": True})
    assert "ttc" not in data
    assert first.choices[0].model_extra["token_ids"] == second.choices[0].model_extra["token_ids"]
    assert first.usage.completion_tokens == len(first.choices[0].model_extra["token_ids"])
    # The completions endpoint on the same rendered prompt decodes the same greedy tokens.
    completion = client.completions.create(model=SERVED_NAME, prompt="<s>Q: 3+4=?\n<think>",
                                           max_tokens=120, temperature=0,
                                           extra_body={"return_token_ids": True})
    Completion.model_validate(completion.model_dump())
    assert completion.choices[0].model_extra["token_ids"] == first.choices[0].model_extra["token_ids"]


# -- single-trace controls --------------------------------------------------------------------

def test_thinking_budget_via_extra_body(client, testbed_tokenizer):
    resp, data = raw_chat(client, messages=chat(HARD), max_tokens=300, temperature=0,
                          extra_body={"ttc": {"max_think": 30}})
    thinking = reasoning_of(resp.choices[0].message)
    assert 0 < n_tokens(testbed_tokenizer, thinking) <= 30
    assert "Time is up, concluding." in thinking
    assert data["ttc"]["thinking_tokens"] == n_tokens(testbed_tokenizer, thinking)  # the usage block


def test_reasoning_effort_maps_to_the_effort_table(client, testbed_tokenizer):
    low, _ = raw_chat(client, messages=chat(HARD), max_tokens=400, temperature=0,
                      reasoning_effort="low")
    high, _ = raw_chat(client, messages=chat(HARD), max_tokens=400, temperature=0,
                       reasoning_effort="high")
    low_n = n_tokens(testbed_tokenizer, reasoning_of(low.choices[0].message))
    high_n = n_tokens(testbed_tokenizer, reasoning_of(high.choices[0].message))
    assert low_n <= 32 < high_n  # testbed table: low 32, high 256


def test_single_trace_controls_stream(client, testbed_tokenizer):
    stream = client.chat.completions.create(model=SERVED_NAME, messages=chat(HARD), max_tokens=200,
                                            temperature=0, stream=True,
                                            extra_body={"ttc": {"max_think": 40}})
    reasoning, content, finish, chunks = "", "", None, 0
    for chunk in stream:
        ChatCompletionChunk.model_validate(chunk.model_dump())
        chunks += 1
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning") or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert chunks > 5 and finish in ("stop", "length")
    assert 0 < n_tokens(testbed_tokenizer, reasoning) <= 40
    assert reasoning.endswith("Time is up, concluding.")


def test_single_trace_controls_on_completions(client, testbed_tokenizer):
    resp = client.completions.create(model=SERVED_NAME, prompt=f"<s>Q: {HARD}\n<think>",
                                     max_tokens=200, temperature=0,
                                     extra_body={"ttc": {"max_think": 25}})
    text = resp.choices[0].text
    assert "</think>" in text
    assert n_tokens(testbed_tokenizer, text.split("</think>")[0]) <= 25


# -- search -----------------------------------------------------------------------------------

SEARCHES = {
    "majority": {"strategy": "majority", "n": 4},
    "weighted_vote": {"strategy": "weighted_vote", "n": 4},
    "best_of_n": {"strategy": "best_of_n", "n": 4},
    "beam": {"strategy": "beam", "n": 4, "beam_width": 2, "max_steps": 12},
    "dvts": {"strategy": "dvts", "n": 4, "beam_width": 2, "max_steps": 12},
    "mcts": {"strategy": "mcts", "n": 2, "beam_width": 2, "max_steps": 12, "mcts": {"rollouts": 6}},
}


@pytest.mark.parametrize("name", list(SEARCHES))
def test_search_strategy_returns_one_openai_response(client, name):
    resp, data = raw_chat(client, messages=chat("12+7+30=?"), max_tokens=400, seed=1,
                          extra_body={"ttc": {"search": SEARCHES[name]}, "return_token_ids": True})
    assert len(resp.choices) == 1
    usage = data["ttc"]
    assert usage["strategy"] == name and usage["searches"] == 1
    assert usage["candidates"] >= 1 and usage["engine_requests"] >= 1
    assert usage["generated_tokens"] >= resp.usage.completion_tokens > 0
    assert resp.usage.completion_tokens == len(resp.choices[0].model_extra["token_ids"])
    assert (usage["prm_calls"] == 0) == (name == "majority")
    message = resp.choices[0].message
    if usage["answers"][0] is not None:  # the reasoning parser split the chosen trace
        assert reasoning_of(message) and "</think>" not in reasoning_of(message)
        assert usage["answers"][0] in (message.content or "")


def test_search_carries_its_thinking_budget_to_every_sample(client):
    """ttc.max_think next to ttc.search: every sampled trace is capped by the logits
    processor (each is its own engine request), so the chosen one is too."""
    from ttc_vllm.testbed.tokenizer import load_testbed_tokenizer

    end = load_testbed_tokenizer().convert_tokens_to_ids("</think>")
    question = chat("812+407+695+333+904+518+276+649=?")   # ~105 thinking tokens uncapped
    lengths = {}
    for cap in (None, 30):
        controls = {} if cap is None else {"max_think": cap, "conclusion": "<step>\n"}
        resp, data = raw_chat(client, messages=question, max_tokens=400, seed=4,
                              extra_body={"ttc": {**controls, "search": {"strategy": "majority", "n": 3}},
                                          "return_token_ids": True})
        ids = resp.choices[0].model_extra["token_ids"]
        assert end in ids and data["ttc"]["searches"] == 1
        lengths[cap] = ids.index(end)
    assert lengths[30] <= 30 < lengths[None]


def test_step_search_continues_parents_and_hits_the_prefix_cache(client):
    _, data = raw_chat(client, messages=chat("512+377+804=?"), max_tokens=400, seed=2,
                       extra_body={"ttc": {"search": SEARCHES["beam"]}})
    usage = data["ttc"]
    assert usage["generator_calls"] >= 2  # several rounds
    # every round after the first continues parents whose prefixes fill >= 1 block
    assert usage["cached_prompt_tokens"] >= BLOCK * (usage["generator_calls"] - 1)


def test_search_streams_with_the_usage_block_last(client):
    stream = client.chat.completions.create(
        model=SERVED_NAME, messages=chat("12+7=?"), max_tokens=300, stream=True,
        stream_options={"include_usage": True},
        extra_body={"ttc": {"search": {"strategy": "majority", "n": 3}}})
    chunks = list(stream)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    assert chunks[-1].usage is not None and chunks[-1].model_extra["ttc"]["candidates"] == 3
    assert all("ttc" not in (c.model_extra or {}) for c in chunks[:-1])
    text = "".join((c.choices[0].delta.content or "") + ((c.choices[0].delta.model_extra or {}).get("reasoning") or "")
                   for c in chunks if c.choices)
    assert text


def test_search_on_completions_with_two_prompts(client):
    raw = client.completions.with_raw_response.create(
        model=SERVED_NAME, prompt=["<s>Q: 3+4=?\n<think>", "<s>Q: 10+20=?\n<think>"], max_tokens=200,
        extra_body={"ttc": {"search": {"strategy": "majority", "n": 3}}})
    data = raw.http_response.json()
    resp = Completion.model_validate(data)
    assert len(resp.choices) == 2
    assert data["ttc"]["searches"] == 2 and data["ttc"]["candidates"] == 6


# -- malformed requests -----------------------------------------------------------------------

SERVER_CASES = [c for c in MALFORMED_CASES if c[0] != "search_needs_prm"]  # this server has a PRM


@pytest.mark.parametrize("case_id,fields,param", SERVER_CASES, ids=[c[0] for c in SERVER_CASES])
def test_malformed_request_is_a_400_naming_the_field_and_serving_continues(client, case_id, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SERVED_NAME, messages=chat(EASY), extra_body=fields)
    error = e.value.response.json()["error"]
    assert error["param"] == param and error["code"] == 400
    assert error["message"].startswith(param + ":")
    ok = client.chat.completions.create(model=SERVED_NAME, messages=chat(EASY), max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_at_least_thirty_kinds_of_malformed_requests():
    assert len(SERVER_CASES) >= 30


# -- disconnect -------------------------------------------------------------------------------

def test_disconnect_mid_search_aborts_every_sub_request(server, client):
    """A search dropped by its client mid-way is aborted: its sub-request in flight is
    aborted, no new one starts, and the engine goes back to idle (no running or waiting
    request, KV usage 0). No assertion depends on how fast the machine is:

    - The search cannot end on its own while the test watches: MCTS with c_puct=100 (near
      breadth-first, so no trace gets deep enough to finish; ignore_eos, inherited by every
      step, keeps traces open) runs all its rollouts -- as many as the server's work
      ceiling allows -- one after the other, each one engine request of max_step_tokens
      tokens (the delimiter never occurs): 4096 x 16 = 65,536 decode steps in sequence,
      thousands of times one rollout. The socket is closed at the first poll (every 50 ms)
      that sees the first rollout finished, and "nothing has come back yet" is asserted
      directly; the deadline on that wait is liveness only (a CI machine once took over
      60 s). The test starts on an idle engine, so earlier tests' work does not count.
    - The search is seen running through a counter (finished step requests), not the
      running/KV gauges: gauges sampled between rollouts can miss a running search.
    - The client is a raw socket, so the disconnect happens exactly when the test decides.
    - Idle after the disconnect is awaited (a deadline for liveness only), but idle gauges
      alone can be a gap between rollouts. "No step request of the search finishes
      afterwards" is shown by events instead of a sleep: a plain request, sent after the
      disconnect, completes -- so the server has handled the disconnect -- and then a second
      one completes while the count of requests finished normally grows by exactly that
      one. Each is 64 tokens with ignore_eos: it ends by length, so vLLM records it before it
      answers, and a live search would finish rollouts of 16 tokens alongside it."""
    from ttc_vllm.limits import MAX_COUNT
    from tests.live_server import MAX_SEARCH_WORK

    beam_width, step_tokens, first_rollout_deadline_s = 2, 16, 300
    rollouts = min(MAX_SEARCH_WORK // beam_width, MAX_COUNT)  # MCTS work: beam_width x rollouts
    assert rollouts * step_tokens >= 30_000, (
        "the server's work ceiling no longer allows a search far longer than one rollout")
    body = json.dumps({"model": SERVED_NAME, "messages": chat(HARD), "max_tokens": 440, "seed": 3,
                       "ignore_eos": True,
                       "ttc": {"search": {"strategy": "mcts", "n": 8, "beam_width": beam_width,
                                          "max_steps": 1024, "max_step_tokens": step_tokens,
                                          "step_delimiter": "@@never@@",
                                          "mcts": {"rollouts": rollouts, "c_puct": 100.0}}}}).encode()

    def metrics() -> tuple[float, float, dict[str, float]]:
        """(requests finished normally, requests aborted, gauges); a busy server may take
        long to answer /metrics, hence the long timeout."""
        text = httpx.get(f"{server.url}/metrics", timeout=300).text
        done = aborted = 0.0
        gauges = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0,
                  "vllm:kv_cache_usage_perc": 0.0}
        for name, labels, value in re.findall(r"^([\w:]+)(\{[^}]*\})?\s+(\S+)$", text, re.M):
            if name == "vllm:request_success_total":
                if 'finished_reason="abort"' in labels:
                    aborted += float(value)
                else:
                    done += float(value)
            elif name in gauges:
                gauges[name] += float(value)
        return done, aborted, gauges

    deadline = time.monotonic() + 300  # liveness only: earlier tests' searches may still drain
    while True:
        done_before, aborted_before, gauges = metrics()
        if not any(gauges.values()):
            break
        assert time.monotonic() < deadline, f"not idle before the search: {gauges}"
        time.sleep(0.2)
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                 b"\r\n\r\n" + body)
    deadline = time.monotonic() + first_rollout_deadline_s  # liveness only
    try:
        while True:
            if metrics()[0] >= done_before + beam_width:  # the first rollout's children
                break
            assert time.monotonic() < deadline, "no rollout of the search seen in time"
            time.sleep(0.05)
        sock.settimeout(0.0)
        try:
            early = sock.recv(1)  # nothing may have come back: the search is still running
        except BlockingIOError:
            early = b""
        if early:  # say what came back (an error, or a search that ended this early)
            sock.settimeout(2.0)
            try:
                early += sock.recv(600)
            except OSError:
                pass
        assert early == b"", f"the search ended before the client gave up: {early[:600]!r}"
    finally:
        sock.close()  # the client gives up
    deadline = time.monotonic() + 60  # liveness only
    while True:
        done_at_idle, _, gauges = metrics()
        if not any(gauges.values()):
            break
        assert time.monotonic() < deadline, f"not idle after the disconnect: {gauges}"
        time.sleep(0.2)
    assert done_at_idle - done_before < beam_width * rollouts, "the whole search ran"

    def plain_request() -> None:
        r = client.chat.completions.create(model=SERVED_NAME, messages=chat(EASY), max_tokens=64,
                                           temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"

    plain_request()  # answered after the disconnect, so the server has handled it by now
    done_settled = metrics()[0]
    plain_request()
    done_after, aborted_after, gauges = metrics()
    assert done_after == done_settled + 1, (
        f"{done_after - done_settled - 1:g} step requests finished while one plain request ran, "
        f"after the disconnect: the search kept running ({aborted_after - aborted_before:g} "
        "of its requests were aborted)")
    assert not any(gauges.values()), f"not idle after the plain requests: {gauges}"


# -- dashboards -------------------------------------------------------------------------------

def test_grafana_dashboards_query_metrics_the_server_exports(server, client):
    """Every vLLM metric a shipped dashboard queries is exported by the running server."""
    client.chat.completions.create(model=SERVED_NAME, messages=chat(EASY), max_tokens=8)  # fill histograms
    exported = set(re.findall(r"^(vllm:[\w:]+)", httpx.get(f"{server.url}/metrics", timeout=10).text, re.M))
    dashboards = sorted((ROOT / "grafana").glob("*.json"))
    assert dashboards
    for path in dashboards:
        queried = set(re.findall(r"vllm:[\w:]+", path.read_text()))
        assert queried, f"{path.name} queries no vLLM metric"
        missing = sorted(queried - exported)
        assert not missing, f"{path.name} queries metrics the server does not export: {missing}"
