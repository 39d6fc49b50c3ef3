"""What an operator and a client see of test-time compute on a real `ttc-vllm serve`: the
`ttc` usage block on every response that sent ttc options (JSON and streamed), OpenAI's
reasoning_tokens made right, and the ttc_* metrics on the server's own /metrics.

The session server runs vLLM's CPU backend: the worker is a separate process from the
scheduler, so how thinking ended reads "unknown" here (tests/test_engine_records.py checks
the controller's reasons in a one-process engine)."""
from __future__ import annotations

import re

import httpx
import pytest

from tests.live_server import BLOCK, EASY, HARD, SERVED_NAME

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.server


def chat(question: str):
    return [{"role": "user", "content": question}]


def scrape(server) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=120).text
    out = {}
    for name, labels, value in re.findall(r"^(ttc_[\w:]+)(?:\{([^}]*)\})?\s+(\S+)$", text, re.M):
        pairs = frozenset(re.findall(r'(\w+)="([^"]*)"', labels or ""))
        out[(name, pairs)] = float(value)
    return out


def sample(samples, name, **labels) -> float:
    want = set(labels.items()) | {("model_name", SERVED_NAME)} if "reason" not in labels else set(labels.items())
    return sum(v for (n, pairs), v in samples.items() if n == name and want <= set(pairs))


def tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def testbed_tokenizer():
    from ttc_vllm.testbed.tokenizer import build_tokenizer

    return build_tokenizer()


def test_a_controlled_request_carries_its_usage_block(client, server, testbed_tokenizer):
    before = scrape(server)
    raw = client.chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=chat(HARD), max_tokens=300, temperature=0,
        extra_body={"ttc": {"max_think": 30}, "return_token_ids": True})
    data = raw.http_response.json()
    block = data["ttc"]
    reasoning = data["choices"][0]["message"].get("reasoning") or data["choices"][0]["message"].get(
        "reasoning_content")
    assert block["thinking_tokens"] == tokens(testbed_tokenizer, reasoning) <= 30
    assert block["thinking_ended"] == ["unknown"]
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == block["thinking_tokens"]
    kv = block["kv"]
    prompt, completion = data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"]
    assert kv["peak_blocks"] == -(-(prompt + completion - 1) // BLOCK)
    assert kv["block_seconds"] > 0 and kv["block_size"] == BLOCK
    assert "kv_transfer_params" not in data or data["kv_transfer_params"] is None
    after = scrape(server)
    assert sample(after, "ttc_requests_total", kind="controlled") == \
        sample(before, "ttc_requests_total", kind="controlled") + 1
    assert sample(after, "ttc_thinking_tokens_sum", ended="unknown") == \
        sample(before, "ttc_thinking_tokens_sum", ended="unknown") + block["thinking_tokens"]
    assert sample(after, "ttc_request_kv_peak_blocks_sum", kind="controlled") == \
        sample(before, "ttc_request_kv_peak_blocks_sum", kind="controlled") + kv["peak_blocks"]


def test_a_streamed_controlled_request_gets_the_block_in_its_usage_chunk(client):
    stream = client.chat.completions.create(
        model=SERVED_NAME, messages=chat(HARD), max_tokens=200, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ttc": {"max_think": 40}})
    last = None
    for chunk in stream:
        last = chunk
    block = last.model_extra["ttc"]
    assert 0 < block["thinking_tokens"] <= 40
    assert last.usage.completion_tokens_details.reasoning_tokens == block["thinking_tokens"]
    assert block["kv"]["peak_blocks"] >= 1


def test_plain_requests_are_counted_and_their_responses_unchanged(client, server):
    before = scrape(server)
    raw = client.chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=chat(EASY), max_tokens=16, temperature=0)
    data = raw.http_response.json()
    assert "ttc" not in data and data.get("kv_transfer_params") is None
    after = scrape(server)
    assert sample(after, "ttc_requests_total", kind="plain") == \
        sample(before, "ttc_requests_total", kind="plain") + 1
    assert sample(after, "ttc_request_kv_peak_blocks_count", kind="plain") == \
        sample(before, "ttc_request_kv_peak_blocks_count", kind="plain") + 1


def test_a_beam_search_reports_its_kv_with_shared_blocks_once(client, server):
    before = scrape(server)
    raw = client.chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=chat(HARD), max_tokens=300, temperature=0.8, seed=5,
        extra_body={"ttc": {"search": {"strategy": "beam", "n": 4, "beam_width": 2,
                                       "max_steps": 6}}})
    block = raw.http_response.json()["ttc"]
    kv = block["kv"]
    assert block["strategy"] == "beam" and block["engine_requests"] >= 2
    # every step continues a parent: its prompt blocks are the parent's, held once
    assert 1 <= kv["peak_blocks"] < kv["sum_of_request_peaks"]
    assert kv["cached_blocks"] > 0
    after = scrape(server)
    assert sample(after, "ttc_search_requests_total", strategy="beam") == \
        sample(before, "ttc_search_requests_total", strategy="beam") + 1
    assert sample(after, "ttc_search_kv_peak_blocks_sum", strategy="beam") == \
        sample(before, "ttc_search_kv_peak_blocks_sum", strategy="beam") + kv["peak_blocks"]
    assert sample(after, "ttc_requests_total", kind="search") >= \
        sample(before, "ttc_requests_total", kind="search") + block["engine_requests"]
    assert sample(after, "ttc_searches_kv_blocks") == 0   # nothing in flight any more


def test_refused_requests_are_counted_by_reason(client, server):
    before = scrape(server)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SERVED_NAME, messages=chat(EASY), max_tokens=16,
                                       extra_body={"ttc": {"max_think": -5}})
    after = scrape(server)
    assert sample(after, "ttc_rejected_requests_total", reason="invalid_option") == \
        sample(before, "ttc_rejected_requests_total", reason="invalid_option") + 1
