"""A minimal HTTP/1.1 keep-alive client over one socket, and the hostile requests the
server suite sends through it (tests/test_hostile_requests.py; benchmarks/soak.py reuses the
client). httpx and the openai client hide which connection a request used and refuse to
send some of these bodies; a raw socket sends exactly these bytes and shows whether the
server kept the connection."""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import Any

from tests.ttc_malformed_cases import CONTEXT_CASES, MALFORMED_CASES

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


class Connection:
    """One TCP connection; `request` sends one request and reads its whole response."""

    def __init__(self, host: str, port: int, timeout: float = 300.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> Response:
        head = {"Host": "127.0.0.1", "Content-Type": "application/json",
                "Content-Length": str(len(body)), **(headers or {})}
        lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return self._read_response()

    def _read(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self.buffer += self._read()
        out, self.buffer = self.buffer.split(marker, 1)
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._read()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _read_response(self) -> Response:
        head = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self._until(b"\r\n").split(b";")[0], 16)
                body += self._exactly(size)
                self._until(b"\r\n")
                if size == 0:
                    break
        else:
            body = self._exactly(int(headers.get("content-length", "0")))
        return Response(status, headers, body)


# -- the hostile requests ------------------------------------------------------------------

@dataclass(frozen=True)
class Hostile:
    """One kind of hostile request and what the server must answer.

    `status`: the exact status, or 4 for "some 4xx" where vLLM answers with its own
    validation (never a 5xx). `param`: the error's param when ttc-vllm answers."""

    id: str
    body: bytes
    status: int
    param: str | None = None
    path: str = CHAT_PATH
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)


def chat_body(served: str, **fields) -> dict[str, Any]:
    return {"model": served, "messages": [{"role": "user", "content": "3+4=?"}],
            "max_tokens": 8, **fields}


def completion_body(served: str, **fields) -> dict[str, Any]:
    return {"model": served, "prompt": "<s>Q: 3+4=?\n<think>", "max_tokens": 8, **fields}


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def hostile_requests(served: str, max_body_bytes: int) -> list[Hostile]:
    """Every kind, on both endpoints where it applies."""
    def chat(**fields) -> bytes:
        return encode(chat_body(served, **fields))

    def completion(**fields) -> bytes:
        return encode(completion_body(served, **fields))

    deep = b"[" * 100_000 + b"]" * 100_000
    long_int = b"9" * 5000
    out: list[Hostile] = []
    # Every malformed TTC option (bounds, strict types, cross-field, context rules): a 400
    # naming the field, on both endpoints. search_needs_prm: this server has a PRM.
    for case_id, fields, param in MALFORMED_CASES + CONTEXT_CASES:
        if case_id == "search_needs_prm":
            continue
        chat_fields = {"max_tokens": None, **fields}
        out.append(Hostile(f"chat:{case_id}", encode({k: v for k, v in chat_body(served, **chat_fields).items()
                                                     if v is not None}), 400, param))
    for case_id, fields, param in MALFORMED_CASES:
        if case_id.startswith(("max_think_10e30", "max_think_2_63", "thinking_budget_10e20",
                               "max_extensions_10e20", "halting_min_tokens_10e20",
                               "search_max_think_10e30", "max_think_true", "max_think_numeric_string",
                               "xargs_string_with_effort", "search_work_over_ceiling")):
            out.append(Hostile(f"completions:{case_id}", completion(**fields), 400, param,
                               COMPLETIONS_PATH))
    out += [
        # issue 16's 47 s request, grown past this server's ceiling of 8192 units of work:
        # 32 prompts x MCTS (4 children x 65 rollouts) = 8320
        Hostile("completions:mcts_32_prompts", completion(
            prompt=["<s>Q: 3+4=?\n<think>"] * 32,
            ttc={"search": {"strategy": "mcts", "n": 64, "mcts": {"rollouts": 65}}}),
            400, "ttc.search", COMPLETIONS_PATH),
        # -- bodies ttc-vllm cannot parse at all --------------------------------------------
        Hostile("nested_100k_in_ttc", b'{"ttc": ' + deep + b"}", 400, "body"),
        Hostile("nested_100k_in_ttc_completions", b'{"ttc": ' + deep + b"}", 400, "body",
                COMPLETIONS_PATH),
        Hostile("nested_100k_beside_ttc", b'{"ttc": {}, "messages": ' + deep + b"}", 400, "body"),
        Hostile("int_5000_digits_in_ttc", b'{"model": "m", "ttc": {"max_think": ' + long_int + b"}}",
                400, "body"),
        Hostile("int_5000_digits_in_max_tokens", b'{"model": "m", "ttc": {}, "max_tokens": ' + long_int + b"}",
                400, "body"),
        Hostile("int_5000_digits_completions", b'{"model": "m", "prompt": "x", "ttc": {"max_think": ' +
                long_int + b"}}", 400, "body", COMPLETIONS_PATH),
        # -- bodies vLLM judges (no TTC request in them): its own 4xx ---------------------------
        Hostile("nested_100k_without_ttc", b'{"messages": ' + deep + b"}", 4),
        Hostile("int_5000_digits_without_ttc", b'{"model": "m", "max_tokens": ' + long_int + b"}", 4),
        Hostile("not_json_with_ttc", b'{"ttc": {max_think: 5}', 4),
        Hostile("not_json_completions", b'{"ttc": ', 4, path=COMPLETIONS_PATH),
        Hostile("empty_body", b"", 4),
        Hostile("json_null", b"null", 4),
        Hostile("json_array_with_ttc", b'[{"ttc": {"max_think": 5}}]', 4),
        Hostile("json_string_ttc", b'"ttc"', 4),
        Hostile("json_number", b"5", 4),
        Hostile("invalid_utf8_with_ttc", b'{"ttc": {"conclusion": "\xff\xfe"}}', 4),
        # UTF-16 / UTF-32 JSON parses in vLLM too: its options must not slip past unread
        Hostile("utf16_body", chat(ttc={"max_think": 10 ** 30}).decode().encode("utf-16"), 400,
                "ttc.max_think"),
        Hostile("utf32_body", chat(ttc={"max_think": True}).decode().encode("utf-32"), 400,
                "ttc.max_think"),
        Hostile("utf8_bom_body", b"\xef\xbb\xbf" + chat(ttc={"max_think": -1}), 4),
        Hostile("messages_missing", encode({"model": served, "ttc": {"max_think": 5}}), 4),
        Hostile("messages_not_list", chat(messages="hi", ttc={"max_think": 5}), 4),
        Hostile("max_tokens_negative", chat(max_tokens=-1, ttc={"max_think": 0}), 4),
        Hostile("max_tokens_huge", chat(max_tokens=10 ** 30, ttc={"max_think": 5}), 4),
        Hostile("max_tokens_string", chat(max_tokens="8", ttc={"max_think": 5}), 4),
        Hostile("stream_string", chat(stream="yes", ttc={"max_think": 5}), 4),
        Hostile("reasoning_effort_number", chat(reasoning_effort=5), 4),
        Hostile("reasoning_effort_unknown", chat(reasoning_effort="extreme"), 4),
        Hostile("unknown_model", encode(chat_body("no-such-model", ttc={"max_think": 0})), 404),
        Hostile("completions_prompt_missing", encode({"model": served, "ttc": {"max_think": 5}}), 4,
                path=COMPLETIONS_PATH),
        # -- JSON that parses into values no option admits -----------------------------------
        Hostile("nan_threshold", chat().replace(b'"max_tokens": 8', b'"max_tokens": 8, "ttc": {"halting": {"threshold": NaN}}'),
                400, "ttc.halting.threshold"),
        Hostile("infinity_max_think", chat().replace(b'"max_tokens": 8', b'"max_tokens": 8, "ttc": {"max_think": Infinity}'),
                400, "ttc.max_think"),
        Hostile("1e400_max_think", chat().replace(b'"max_tokens": 8', b'"max_tokens": 8, "ttc": {"max_think": 1e400}'),
                400, "ttc.max_think"),
        Hostile("escaped_key_bad_value", b'{"model": "m", "\\u0074tc": {"max_think": -1}}', 400,
                "ttc.max_think"),
        Hostile("duplicate_ttc_last_wins", chat().replace(
            b'"max_tokens": 8', b'"max_tokens": 8, "ttc": {"max_think": 5}, "ttc": {"max_think": true}'),
            400, "ttc.max_think"),
        Hostile("conclusion_1mb", chat(ttc={"conclusion": "x" * (1 << 20)}), 400, "ttc"),
        Hostile("ttc_10000_keys", chat(ttc={f"k{i}": i for i in range(10_000)}), 400, "ttc"),
        Hostile("xargs_ttc_number", chat(vllm_xargs={"ttc": 5}), 400, "vllm_xargs.ttc"),
        Hostile("xargs_ttc_array_json", chat(vllm_xargs={"ttc": "[1]"}), 400, "vllm_xargs.ttc"),
        Hostile("xargs_ttc_20kb", chat(vllm_xargs={"ttc": json.dumps({"conclusion": "x" * 20_000})}),
                400, "vllm_xargs.ttc"),
        Hostile("search_n_huge_top_level", chat(n=10 ** 30, ttc={"search": {"strategy": "majority"}}),
                400, "n"),
        Hostile("search_step_tokens_huge", chat(ttc={"search": {"strategy": "beam", "n": 4, "beam_width": 2,
                                                                "max_step_tokens": 10 ** 9}}),
                400, "ttc.search.max_step_tokens"),
        Hostile("search_streaming_bad", chat(stream=True, ttc={"max_think": 10 ** 30,
                                                               "search": {"strategy": "majority"}}),
                400, "ttc.max_think"),
        Hostile("stream_bad_budget", chat(stream=True, ttc={"max_think": -5}), 400, "ttc.max_think"),
        # -- sizes ----------------------------------------------------------------------------
        Hostile("body_over_limit", b'{"ttc": {}, "pad": "' + b"x" * (max_body_bytes + 1) + b'"}', 413,
                "body"),
        Hostile("body_over_limit_without_ttc", b'{"pad": "' + b"x" * (max_body_bytes + 1) + b'"}', 413,
                "body", COMPLETIONS_PATH),
        # -- methods and paths ------------------------------------------------------------------
        Hostile("get_with_ttc_body", chat(ttc={"max_think": 10 ** 30}), 405, method="GET"),
        Hostile("put_with_ttc_body", chat(ttc={"max_think": 10 ** 30}), 405, method="PUT"),
        Hostile("unknown_path_with_ttc", chat(ttc={"max_think": 10 ** 30}), 404, path="/v1/ttc"),
        # /tokenize generates nothing: a ttc field there changes nothing and is ignored
        Hostile("tokenize_with_ttc", encode({"model": served, "prompt": "x", "ttc": {"max_think": 10 ** 30}}),
                200, path="/tokenize"),
        Hostile("tokenize_nested_100k", b'{"prompt": ' + deep + b"}", 4, path="/tokenize"),
        # generation endpoints that cannot serve TTC options refuse them instead of ignoring them
        Hostile("responses_with_ttc", encode({"model": served, "input": "3+4=?", "max_output_tokens": 8,
                                              "ttc": {"max_think": 5}}), 400, "ttc", "/v1/responses"),
        Hostile("messages_with_ttc", encode({"model": served, "max_tokens": 8, "ttc": {"max_think": 5},
                                             "messages": [{"role": "user", "content": "3+4=?"}]}),
                400, "ttc", "/v1/messages"),
        Hostile("generate_with_xargs_ttc", encode({"token_ids": [1, 2], "sampling_params": {},
                                                   "vllm_xargs": {"ttc": "{}"}}), 400, "ttc",
                "/inference/v1/generate"),
        Hostile("responses_without_ttc", encode({"model": served, "input": "3+4=?",
                                                 "max_output_tokens": 8}), 200, path="/v1/responses"),
        # /invocations (SageMaker) serves chat and completion bodies: their options are read
        Hostile("invocations_chat_bad_budget", chat(ttc={"max_think": 10 ** 30}), 400, "ttc.max_think",
                "/invocations"),
        Hostile("invocations_completion_bad_search", completion(ttc={"search": {"strategy": "genetic"}}),
                400, "ttc.search.strategy", "/invocations"),
        Hostile("embeddings_with_ttc", encode({"model": served, "input": "x", "ttc": {}}), 4,
                path="/v1/embeddings"),
    ]
    return out
