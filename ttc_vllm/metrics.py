"""Every Prometheus metric ttc-vllm exports, defined once.

They live in the API-server process, in prometheus-client's default registry, so vLLM's own
`/metrics` endpoint exports them next to its `vllm:*` metrics (no extra port). Numbers taken
in the engine core (KV blocks, how thinking ended) reach this process inside each finished
request's output (ttc_vllm_plugins/engine_records.py) and are observed here.

Conventions: `ttc_` prefix, base units (seconds, blocks, tokens), `_total` counters,
histograms with explicit buckets, and labels from small closed sets only (model, kind,
strategy, signal, action, ended, effort, reason) -- never a request id. Counters are
created with every label value they can take up front where the set is closed, so a
dashboard shows 0 rather than "no data" before the first event.
"""
from __future__ import annotations

from typing import Any, Iterable, get_args

from prometheus_client import Counter, Gauge, Histogram

from ttc_vllm.budget import EFFORT_LEVELS
from ttc_vllm.control_state import REASON_NAMES
from ttc_vllm.halting import SIGNALS
from ttc_vllm.search.options import Strategy

MODEL = "model_name"          # vLLM's label name for the served model
KINDS = ("plain", "controlled", "search")   # no ttc options / thinking controls / a search's
STRATEGIES: tuple[str, ...] = get_args(Strategy)
ACTIONS = ("conclude", "stop")
EFFORTS = EFFORT_LEVELS
FORCED_KINDS = ("conclusion", "continuation", "eos")
# how thinking ended: the controller's reasons, or "unknown" where the engine could not read
# the controller (a worker in another process than the scheduler)
ENDINGS = REASON_NAMES + ("unknown",)
REJECTIONS = ("invalid_option", "body_too_large", "too_much_work", "too_many_searches",
              "unsupported_endpoint", "not_enabled", "search_unavailable")

BLOCK_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
BLOCK_SECONDS_BUCKETS = (0.1, 0.5, 1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 50000, 100000)
TOKEN_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# -- KV cache, per request and per search ---------------------------------------------------
request_kv_peak_blocks = Histogram(
    "ttc_request_kv_peak_blocks", "Most KV-cache blocks one engine request held at once.",
    [MODEL, "kind"], buckets=BLOCK_BUCKETS)
request_kv_block_seconds = Histogram(
    "ttc_request_kv_block_seconds", "KV-cache blocks one engine request held, integrated over "
    "the time it held them (block-seconds).", [MODEL, "kind"], buckets=BLOCK_SECONDS_BUCKETS)
request_kv_blocks = Counter(
    "ttc_request_kv_blocks", "KV-cache blocks engine requests used, by where they came from: "
    "newly allocated, or found in the prefix cache at admission.", [MODEL, "kind", "source"])
search_kv_peak_blocks = Histogram(
    "ttc_search_kv_peak_blocks", "Most distinct KV-cache blocks the engine requests of one "
    "search held at once (a shared prefix block counts once).", [MODEL, "strategy"],
    buckets=BLOCK_BUCKETS)
search_kv_block_seconds = Histogram(
    "ttc_search_kv_block_seconds", "Distinct KV-cache blocks one search held, integrated over "
    "time (block-seconds).", [MODEL, "strategy"], buckets=BLOCK_SECONDS_BUCKETS)
searches_kv_blocks = Gauge(
    "ttc_searches_kv_blocks", "Distinct KV-cache blocks held by the engine requests of the "
    "searches in flight, as of the engine's latest report.", [MODEL], multiprocess_mode="livemax")

# -- thinking controls ------------------------------------------------------------------------
thinking_tokens = Histogram(
    "ttc_thinking_tokens", "Thinking tokens of one controlled request (forced ones included), "
    "by how thinking ended: natural (the model closed it), budget, halt, stop (halting forced "
    "EOS), none (still open at the end, or no controls), unknown (not readable by the engine "
    "core).", [MODEL, "ended"], buckets=TOKEN_BUCKETS)
forced_tokens = Counter(
    "ttc_forced_tokens", "Tokens the controller forced: the conclusion (text, </think> and "
    "answer prefix), the min-think continuation (\"Wait\"), a halting EOS.", [MODEL, "kind"])
halts = Counter(
    "ttc_halts", "Requests whose thinking was ended by a halting rule.", [MODEL, "signal", "action"])
effort_requests = Counter(
    "ttc_effort_requests", "Requests that asked for a reasoning effort level.", [MODEL, "effort"])
requests = Counter(
    "ttc_requests", "Finished engine requests seen by ttc-vllm, by kind.", [MODEL, "kind"])
rejected_requests = Counter(
    "ttc_rejected_requests", "HTTP requests ttc-vllm refused, by reason.", ["reason"])
kv_guard_activations = Counter(
    "ttc_kv_guard_activations", "Thinking requests the KV-pressure guard concluded early.", [MODEL])

# -- search -----------------------------------------------------------------------------------
search_requests = Counter(
    "ttc_search_requests", "Searches run (one per prompt).", [MODEL, "strategy"])
search_candidates = Counter(
    "ttc_search_candidates", "Candidate traces searches sampled.", [MODEL, "strategy"])
search_generated_tokens = Counter(
    "ttc_search_generated_tokens", "Tokens generated by searches, all candidates and steps.",
    [MODEL, "strategy"])
search_generator_calls = Histogram(
    "ttc_search_generator_calls", "Generator calls (waves or steps) one search made.",
    [MODEL, "strategy"], buckets=COUNT_BUCKETS)
search_seconds = Histogram(
    "ttc_search_seconds", "Wall time of one search.", [MODEL, "strategy"],
    buckets=SECONDS_BUCKETS[4:] + (60, 120, 300))

# -- PRM --------------------------------------------------------------------------------------
prm_calls = Counter("ttc_prm_calls", "Score calls made to the process reward model.", [MODEL])
prm_seconds = Histogram("ttc_prm_seconds", "Latency of one PRM score call.", [MODEL],
                        buckets=SECONDS_BUCKETS)
prm_batch_traces = Histogram("ttc_prm_batch_traces", "Traces scored by one PRM call.", [MODEL],
                             buckets=COUNT_BUCKETS)
prm_inflight = Gauge("ttc_prm_inflight_calls", "PRM score calls waiting or running (queue depth).",
                     [MODEL], multiprocess_mode="livesum")
prm_failures = Counter("ttc_prm_failures", "PRM score calls that raised.", [MODEL])
prm_retries = Counter("ttc_prm_retries", "PRM batches resent after an actor failed (Ray restarts "
                      "the actor).", [MODEL])


def prime(model: str) -> None:
    """Create every closed-set series for `model` at 0."""
    for kind in KINDS:
        requests.labels(model, kind)
        for source in ("allocated", "prefix_cache"):
            request_kv_blocks.labels(model, kind, source)
    for kind in FORCED_KINDS:
        forced_tokens.labels(model, kind)
    for signal in SIGNALS:
        for action in ACTIONS:
            halts.labels(model, signal, action)
    for effort in EFFORTS:
        effort_requests.labels(model, effort)
    for strategy in STRATEGIES:
        search_requests.labels(model, strategy)
        search_candidates.labels(model, strategy)
        search_generated_tokens.labels(model, strategy)
    for reason in REJECTIONS:
        rejected_requests.labels(reason)
    for metric in (prm_calls, prm_failures, prm_retries, kv_guard_activations):
        metric.labels(model)
    searches_kv_blocks.labels(model)
    prm_inflight.labels(model)


def observe_request(model: str, record: dict[str, Any], kind: str) -> None:
    """One finished engine request's record (see ttc_vllm_plugins/kv_accounting.py)."""
    kind = kind if kind in KINDS else "plain"
    requests.labels(model, kind).inc()
    kv = record.get("kv")
    if kv:
        request_kv_peak_blocks.labels(model, kind).observe(kv["peak_blocks"])
        request_kv_block_seconds.labels(model, kind).observe(kv["block_seconds"])
        request_kv_blocks.labels(model, kind, "allocated").inc(kv["new_blocks"])
        request_kv_blocks.labels(model, kind, "prefix_cache").inc(kv["cached_blocks"])
    thinking = record.get("thinking")
    if thinking:
        ended = thinking.get("ended", "none")
        ended = ended if ended in ENDINGS else "unknown"
        thinking_tokens.labels(model, ended).observe(thinking["thinking_tokens"])
        for forced_kind in FORCED_KINDS:
            count = thinking.get("forced", {}).get(forced_kind, 0)
            if count:
                forced_tokens.labels(model, forced_kind).inc(count)
        if ended == "halt" or ended == "stop":
            signal = thinking.get("signal")
            if signal in SIGNALS:
                halts.labels(model, signal, "stop" if ended == "stop" else "conclude").inc()


def observe_effort(model: str, effort: str | None) -> None:
    if effort in EFFORTS:
        effort_requests.labels(model, effort).inc()


def observe_search(model: str, record: dict[str, Any], kv: dict[str, Any] | None) -> None:
    """One finished search (`response_usage.search_record`) and its group KV record."""
    strategy = record.get("strategy")
    if strategy not in STRATEGIES:
        return
    search_requests.labels(model, strategy).inc()
    search_candidates.labels(model, strategy).inc(record.get("candidates", 0))
    search_generated_tokens.labels(model, strategy).inc(record.get("generated_tokens", 0))
    search_generator_calls.labels(model, strategy).observe(record.get("generator_calls", 0))
    search_seconds.labels(model, strategy).observe(record.get("wall_time_s", 0.0))
    if kv:
        search_kv_peak_blocks.labels(model, strategy).observe(kv["peak_blocks"])
        search_kv_block_seconds.labels(model, strategy).observe(kv["block_seconds"])


def observe_rejection(reason: str) -> None:
    rejected_requests.labels(reason if reason in REJECTIONS else "invalid_option").inc()


def metric_names() -> Iterable[str]:
    """The exported base names (what the dashboards may query)."""
    for value in globals().values():
        if isinstance(value, (Counter, Gauge, Histogram)):
            yield value._name
