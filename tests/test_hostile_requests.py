"""Hostile requests against the real `ttc-vllm serve` (the session server of
tests/live_server.py), each on a kept-alive connection and followed by a normal request on
the same connection: no request may take the server down, answer 5xx, leak a traceback or
cost the client its connection (unless the answer says `Connection: close`, as a 413 must
when the rest of the body is left unread).

The kinds (tests/hostile_http.py): every malformed TTC option on both endpoints -- bounds
past int64 (issue 16's one-line kill, `max_think` 10**30), strict types, cross-field and
context rules, the work ceiling -- bodies Python's parser cannot take (100,000-level
nesting, 5,000-digit integers), encodings, sizes, methods, paths and the endpoints that
cannot serve TTC options."""
from __future__ import annotations

import json
import time

import pytest

from tests.hostile_http import (
    CHAT_PATH, Connection, Hostile, chat_body, encode, hostile_requests,
)
from tests.live_server import MAX_BODY_BYTES, MAX_CONCURRENT_SEARCHES, SERVED_NAME

pytestmark = pytest.mark.server

CASES = hostile_requests(SERVED_NAME, MAX_BODY_BYTES)
NORMAL = encode(chat_body(SERVED_NAME, max_tokens=2))
LONG_SEARCH = encode(chat_body(SERVED_NAME, max_tokens=440, seed=3, ignore_eos=True,
                               messages=[{"role": "user", "content": "512+377+804+219=?"}],
                               ttc={"search": {"strategy": "beam", "n": 64, "beam_width": 4,
                                               "max_steps": 110, "max_step_tokens": 4}}))


class KeptAlive:
    """The suite's one connection, reopened only after an answer that closes it."""

    def __init__(self, server):
        host, port = server.url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.conn = Connection(*self.address)
        self.reopened = 0

    def reopen(self) -> None:
        self.conn.close()
        self.conn = Connection(*self.address)
        self.reopened += 1


@pytest.fixture(scope="module")
def kept_alive(server):
    log_start = server.log.stat().st_size
    link = KeptAlive(server)
    yield link
    link.conn.close()
    # client mistakes are answered, not logged as crashes
    log = server.log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback"):][:3000]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request_is_answered_and_the_connection_serves_on(kept_alive, case: Hostile):
    answer = kept_alive.conn.request(case.method, case.path, case.body, case.headers)
    if case.status == 4:
        assert 400 <= answer.status < 500, (answer.status, answer.body[:500])
    else:
        assert answer.status == case.status, (answer.status, answer.body[:500])
    assert b"Traceback" not in answer.body and b'File "' not in answer.body
    if case.param is not None:
        error = answer.json()["error"]
        assert error["param"] == case.param and error["code"] == case.status
        assert error["message"].startswith(case.param + ":"), error["message"]
        assert len(error["message"]) < 600   # a short message of its own, not a dump
    if answer.closes:
        assert case.status == 413, "only an unread body may cost the connection"
        kept_alive.reopen()
    follow = kept_alive.conn.request("POST", CHAT_PATH, NORMAL)
    assert follow.status == 200, follow.body[:500]
    assert follow.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_at_least_a_hundred_kinds():
    assert len({c.id for c in CASES}) == len(CASES) >= 100


def test_searches_past_the_concurrency_cap_get_429_with_retry_after(server):
    """Fill the cap with long searches (beam over up to 110 rounds of 64 step requests: far
    longer than this test), then a search is refused with 429 + Retry-After while they run
    -- asserted only while both are still unanswered, so the order of events decides, not
    the machine's speed. Once their clients leave, the searches are aborted and a search is
    admitted again."""
    host, port = server.url.removeprefix("http://").split(":")
    address = (host, int(port))
    holders = []
    short = encode(chat_body(SERVED_NAME, max_tokens=4, ttc={"search": {"strategy": "majority", "n": 1}}))
    try:
        for _ in range(MAX_CONCURRENT_SEARCHES):
            conn = Connection(*address)
            head = (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(LONG_SEARCH)}\r\n\r\n").encode()
            conn.sock.sendall(head + LONG_SEARCH)   # the answer is never read
            holders.append(conn)
        probe = Connection(*address)
        deadline = time.monotonic() + 120   # a failure guard only
        while True:
            answer = probe.request("POST", CHAT_PATH, short)
            if answer.status == 429:
                break
            assert answer.status == 200, answer.body[:500]   # admitted before the holders were
            assert time.monotonic() < deadline, "no 429 while the cap was full"
        for conn in holders:   # both long searches were still running at the 429
            conn.sock.settimeout(0.0)
            try:
                early = conn.sock.recv(1)
            except BlockingIOError:
                early = b""
            assert early == b"", "a long search ended before the 429: the cap was not full"
        assert answer.headers.get("retry-after") == "1"
        error = answer.json()["error"]
        assert error["code"] == 429 and "TTC_VLLM_MAX_CONCURRENT_SEARCHES" in error["message"]
        follow = probe.request("POST", CHAT_PATH, NORMAL)   # plain requests are not capped
        assert follow.status == 200
    finally:
        for conn in holders:
            conn.close()
    deadline = time.monotonic() + 120
    while True:   # the aborted searches leave the cap; a search is admitted again
        answer = probe.request("POST", CHAT_PATH, short)
        if answer.status == 200:
            assert "ttc" in json.loads(answer.body)
            break
        assert answer.status == 429 and time.monotonic() < deadline, answer.body[:500]
        time.sleep(0.2)
    probe.close()
