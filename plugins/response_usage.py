"""The `ttc` usage block of a search response, and putting it into vLLM's response (pure).

vLLM writes the response (its own models, reasoning parser, usage); the controller only adds
a top-level `ttc` object next to `usage`: to the JSON body, or, when streaming, to the last
data event before `data: [DONE]` (the usage chunk when the client asked for one).
"""
from __future__ import annotations

import json
from typing import Any, Iterable

# Counters summed over the searches of one response (a completions request may carry several
# prompts, one search each).
COUNTERS = ("candidates", "generated_tokens", "prompt_tokens", "cached_prompt_tokens",
            "generator_calls", "nodes_expanded", "engine_requests", "aborted_requests",
            "prm_calls", "prm_traces", "prm_tokens", "halted")


def search_record(strategy: str, n: int, answer: str | None, candidates: int,
                  accounting: dict[str, Any], engine_requests: int,
                  aborted_requests: int) -> dict[str, Any]:
    """What one search reports (accounting: `Accounting.as_dict()`)."""
    record = {key: int(accounting.get(key, 0)) for key in COUNTERS if key in accounting}
    record.update(strategy=strategy, n=n, answer=answer, candidates=candidates,
                  engine_requests=engine_requests, aborted_requests=aborted_requests,
                  wall_time_s=round(float(accounting.get("wall_time_s", 0.0)), 4))
    return record


def usage_block(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """One block for a response: counters summed, answers in prompt order, the longest
    search's wall time (searches of one response run concurrently)."""
    records = list(records)
    if not records:
        return None
    block: dict[str, Any] = {"strategy": records[0]["strategy"], "n": records[0]["n"],
                             "searches": len(records)}
    for key in COUNTERS:
        block[key] = sum(int(r.get(key, 0)) for r in records)
    block["wall_time_s"] = max(float(r.get("wall_time_s", 0.0)) for r in records)
    block["answers"] = [r.get("answer") for r in records]
    return block


def controls_block(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The usage block of a request with thinking controls and no search, from the engine
    records of its samples (kv_accounting.py): thinking tokens and how thinking ended per
    sample, forced tokens, KV peak blocks (of the samples together: a shared prompt block
    counts once) and block-seconds."""
    records = [r for r in records if r.get("kind") != "search"]
    if not records:
        return None
    thinking = [r.get("thinking") or {} for r in records]
    forced: dict[str, int] = {}
    for t in thinking:
        for kind, count in (t.get("forced") or {}).items():
            forced[kind] = forced.get(kind, 0) + int(count)
    block: dict[str, Any] = {
        "thinking_tokens": sum(int(t.get("thinking_tokens", 0)) for t in thinking),
        "thinking_ended": [t.get("ended", "unknown") for t in thinking],
        "forced_tokens": forced,
        "extensions": sum(int(t.get("extensions", 0)) for t in thinking)}
    block["kv"] = kv_summary(records)
    return block


def kv_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """KV use of a set of engine requests: peak and block-seconds of their union (their
    group's, when they form one), blocks newly allocated and found in the prefix cache."""
    kvs = [r["kv"] for r in records if r.get("kv")]
    if not kvs:
        return None
    groups = [kv["group"] for kv in kvs if kv.get("group")]
    summary = {
        "peak_blocks": max((g["peak_blocks"] for g in groups), default=max(kv["peak_blocks"] for kv in kvs)),
        "block_seconds": round(max((g["block_seconds"] for g in groups),
                                   default=sum(kv["block_seconds"] for kv in kvs)), 6),
        "new_blocks": sum(kv["new_blocks"] for kv in kvs),
        "cached_blocks": sum(kv["cached_blocks"] for kv in kvs),
        "block_size": kvs[0]["block_size"]}
    if len(kvs) > 1:
        summary["sum_of_request_peaks"] = sum(kv["peak_blocks"] for kv in kvs)
    return summary


def add_to_object(data: dict[str, Any], block: dict[str, Any],
                  reasoning_tokens: int | None = None) -> None:
    """Put the `ttc` block into a response (or final stream chunk) object and, when
    known, the thinking tokens into OpenAI's `usage.completion_tokens_details` (vLLM
    counts only a `<think>` the model generated, not one the chat template opened)."""
    data["ttc"] = block
    usage = data.get("usage")
    if reasoning_tokens is not None and isinstance(usage, dict):
        details = usage.get("completion_tokens_details")
        details = dict(details) if isinstance(details, dict) else {}
        details["reasoning_tokens"] = reasoning_tokens
        usage["completion_tokens_details"] = details


def add_to_json(body: bytes, block: dict[str, Any], reasoning_tokens: int | None = None) -> bytes:
    """The JSON response with `"ttc": block` added (unchanged if it is not a JSON object)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body
    if not isinstance(data, dict):
        return body
    add_to_object(data, block, reasoning_tokens)
    return json.dumps(data, separators=(",", ":")).encode()


class SSEUsageInjector:
    """Rewrites a server-sent-event stream so the last data event before `data: [DONE]`
    carries the `ttc` block. Holds back one event at a time; everything else passes
    byte-for-byte. `block` is a callable returning (block, reasoning tokens or None): the
    request finishes after the stream starts."""

    DONE = b"data: [DONE]"

    def __init__(self, block):
        self._block = block
        self._buffer = b""
        self._held: bytes | None = None  # the latest complete event (with its separator)

    def feed(self, chunk: bytes) -> bytes:
        """Bytes that may be sent now."""
        self._buffer += chunk
        out = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                break
            event, self._buffer = self._buffer[:end + 2], self._buffer[end + 2:]
            if event.rstrip() == self.DONE:
                if self._held is not None:
                    out.append(self._inject(self._held))
                    self._held = None
                out.append(event)
                continue
            if self._held is not None:
                out.append(self._held)
            self._held = event
        return b"".join(out)

    def close(self) -> bytes:
        """Whatever is still held when the stream ends (no [DONE]: no injection)."""
        rest = (self._held or b"") + self._buffer
        self._held, self._buffer = None, b""
        return rest

    def _inject(self, event: bytes) -> bytes:
        block, reasoning_tokens = self._block()
        if block is None or not event.startswith(b"data: "):
            return event
        try:
            data = json.loads(event[len(b"data: "):])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return event
        if not isinstance(data, dict):
            return event
        add_to_object(data, block, reasoning_tokens)
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
