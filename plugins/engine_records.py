"""The API-process end of the engine's `ttc` records (ttc_vllm_plugins/kv_accounting.py).

`RecordingEngineClient` wraps the server's engine client (for vLLM's chat and completions
handlers and for the search runner). For every request it:
- marks an n>1 request's samples as one KV group and as siblings (only the last sample's
  output reaches the client under FINAL_ONLY, so the engine sends all records with it);
- takes the `ttc` record out of the final output's `kv_transfer_params` before vLLM's
  handler sees it (so no response grows a `kv_transfer_params` field), observes the
  Prometheus metrics (ttc_vllm/metrics.py), and appends the records to `REQUEST_RECORDS`
  of the HTTP request being served, from which the middleware builds the usage block.
"""
from __future__ import annotations

import contextvars
from typing import Any

from ttc_vllm import metrics
from ttc_vllm_plugins.kv_accounting import GROUP_KEY, RECORD_KEY, SIBLINGS_KEY

# Set by the middleware for one HTTP request; context variables follow the handler into the
# tasks vLLM spawns, so the records of its engine requests land here.
REQUEST_RECORDS: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "ttc_request_records", default=None)


def take_record(output) -> dict[str, Any] | None:
    """Remove and return the `ttc` record of a finished RequestOutput (None if absent)."""
    params = getattr(output, "kv_transfer_params", None)
    if not isinstance(params, dict) or RECORD_KEY not in params:
        return None
    record = params.pop(RECORD_KEY)
    if not params:
        output.kv_transfer_params = None
    return record if isinstance(record, dict) else None


def mark_samples(sampling_params, request_id: str) -> None:
    """An n>1 request: its samples form one KV group (unless a search set one) and a
    sibling set whose records travel together with the last sample's output (under
    FINAL_ONLY vLLM drops the other samples' final outputs; in streaming modes the last
    one is delivered too, so every record arrives exactly once either way). Offline, call
    this on the SamplingParams before `LLM.generate` to get every sample's record."""
    n = getattr(sampling_params, "n", 1) or 1
    if n <= 1:
        return
    extra = sampling_params.extra_args
    if extra is None:
        extra = sampling_params.extra_args = {}
    extra.setdefault(GROUP_KEY, request_id)
    extra[SIBLINGS_KEY] = [request_id, n]


class RecordingEngineClient:
    """Everything of the wrapped engine client, with `generate` recording (see module doc)."""

    def __init__(self, client, model: str):
        self._client = client
        self.model = model
        metrics.prime(model)

    def __getattr__(self, name):
        return getattr(self._client, name)

    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        mark_samples(sampling_params, request_id)
        return self._recorded(self._client.generate(prompt, sampling_params, request_id,
                                                    *args, **kwargs))

    async def _recorded(self, outputs):
        try:
            async for out in outputs:
                if getattr(out, "finished", False):
                    self.observe(take_record(out))
                yield out
        finally:
            await outputs.aclose()

    def observe(self, block: dict[str, Any] | None) -> None:
        if not block:
            return
        records = [r for r in block.get("requests", ()) if isinstance(r, dict)]
        for record in records:
            metrics.observe_request(self.model, record, record.get("kind", "plain"))
        if "searches_kv_blocks" in block:
            metrics.searches_kv_blocks.labels(self.model).set(block["searches_kv_blocks"])
        sink = REQUEST_RECORDS.get()
        if sink is not None:
            sink.extend(records)
