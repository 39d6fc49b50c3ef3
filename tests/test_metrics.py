"""ttc_vllm.metrics: every metric defined once, observed from engine records, with label
sets that stay closed (series count constant over thousands of varied requests) and an
exposition `promtool check metrics` accepts."""
import os
import random
import shutil
import subprocess

import pytest
from prometheus_client import REGISTRY, generate_latest

from ttc_vllm import metrics
from ttc_vllm.control_state import REASON_NAMES
from ttc_vllm.halting import SIGNALS

MODEL = "test-metrics-model"


def value(name, **labels):
    return REGISTRY.get_sample_value(name, {"model_name": MODEL, **labels}) or 0.0


def record(kind="controlled", ended="budget", thinking=100, peak=7, signal=None, forced=None):
    return {"kind": kind,
            "kv": {"peak_blocks": peak, "block_seconds": 2.5, "cached_blocks": 2, "new_blocks": peak - 2,
                   "block_size": 16},
            "thinking": {"thinking_tokens": thinking, "ended": ended, "signal": signal,
                         "forced": forced or {"conclusion": 5, "continuation": 0, "eos": 0}}}


def test_a_finished_request_is_observed_once_in_each_metric():
    metrics.prime(MODEL)
    before = {"requests": value("ttc_requests_total", kind="controlled"),
              "thinking": value("ttc_thinking_tokens_count", ended="budget"),
              "sum": value("ttc_thinking_tokens_sum", ended="budget"),
              "forced": value("ttc_forced_tokens_total", kind="conclusion"),
              "new": value("ttc_request_kv_blocks_total", kind="controlled", source="allocated"),
              "cached": value("ttc_request_kv_blocks_total", kind="controlled", source="prefix_cache"),
              "peak": value("ttc_request_kv_peak_blocks_count", kind="controlled")}
    metrics.observe_request(MODEL, record(), "controlled")
    assert value("ttc_requests_total", kind="controlled") == before["requests"] + 1
    assert value("ttc_thinking_tokens_count", ended="budget") == before["thinking"] + 1
    assert value("ttc_thinking_tokens_sum", ended="budget") == before["sum"] + 100
    assert value("ttc_forced_tokens_total", kind="conclusion") == before["forced"] + 5
    assert value("ttc_request_kv_blocks_total", kind="controlled", source="allocated") == before["new"] + 5
    assert value("ttc_request_kv_blocks_total", kind="controlled", source="prefix_cache") == before["cached"] + 2
    assert value("ttc_request_kv_peak_blocks_count", kind="controlled") == before["peak"] + 1
    assert value("ttc_request_kv_peak_blocks_bucket", kind="controlled", le="8.0") >= 1


def test_halts_count_by_signal_and_action():
    metrics.prime(MODEL)
    conclude = value("ttc_halts_total", signal="entropy", action="conclude")
    stop = value("ttc_halts_total", signal="entropy", action="stop")
    metrics.observe_request(MODEL, record(ended="halt", signal="entropy"), "controlled")
    metrics.observe_request(MODEL, record(ended="stop", signal="entropy",
                                          forced={"eos": 1}), "controlled")
    metrics.observe_request(MODEL, record(ended="natural", signal="entropy"), "controlled")
    assert value("ttc_halts_total", signal="entropy", action="conclude") == conclude + 1
    assert value("ttc_halts_total", signal="entropy", action="stop") == stop + 1


def test_primed_series_read_zero_before_any_event():
    metrics.prime("never-used-model")
    assert REGISTRY.get_sample_value("ttc_search_requests_total",
                                     {"model_name": "never-used-model", "strategy": "beam"}) == 0.0
    assert REGISTRY.get_sample_value("ttc_rejected_requests_total", {"reason": "too_much_work"}) is not None


def series():
    return sum(1 for family in REGISTRY.collect() if family.name.startswith("ttc_")
               for _ in family.samples)


def test_series_count_stays_constant_over_thousands_of_varied_requests():
    """Labels come from closed sets: unknown strategies, reasons and signals map to known
    values or are dropped, request ids never become labels."""
    rng = random.Random(0)
    metrics.prime(MODEL)
    kinds = ["plain", "controlled", "search", "weird-kind"]
    endings = list(REASON_NAMES) + ["unknown", "surprise"]
    signals = list(SIGNALS) + [None, "made-up"]

    def burst(n):
        for i in range(n):
            metrics.observe_request(MODEL, record(kind=rng.choice(kinds), ended=rng.choice(endings),
                                                  thinking=rng.randrange(10 ** 6), peak=rng.randrange(1, 10 ** 5),
                                                  signal=rng.choice(signals)), rng.choice(kinds))
            metrics.observe_search(MODEL, {"strategy": rng.choice(["beam", "mcts", f"x{i}"]),
                                           "candidates": 3, "generated_tokens": 9,
                                           "generator_calls": 2, "wall_time_s": 0.5},
                                   {"peak_blocks": 3, "block_seconds": 1.0})
            metrics.observe_effort(MODEL, rng.choice(["low", "high", f"e{i}", None]))
            metrics.observe_rejection(rng.choice(["too_much_work", f"r{i}"]))

    burst(1000)
    after_first = series()
    burst(1000)
    assert series() == after_first


@pytest.mark.skipif(shutil.which("promtool") is None and not os.environ.get("CI"),
                    reason="promtool not installed (.ci/run installs Debian's prometheus)")
def test_promtool_accepts_the_exposition():
    metrics.prime(MODEL)
    metrics.observe_request(MODEL, record(), "controlled")
    text = b"\n".join(line for line in generate_latest(REGISTRY).splitlines()
                      if line.startswith((b"ttc_", b"# HELP ttc_", b"# TYPE ttc_"))) + b"\n"
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout.decode() + result.stderr.decode())
