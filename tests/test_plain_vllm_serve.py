"""Drop-in means drop-in: vLLM's own server entry point, no flags and no VLLM_PLUGINS, with
ttc-vllm installed. vLLM loads endpoint plugins only when allowlisted, so the sampling
controller is not there; a `ttc` body field must then be a 400 that says how to enable it
-- never silently ignored (`max_think: -5` answered 200 before). The logits processor,
which vLLM always loads, still serves `vllm_xargs.ttc`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.live_server import (
    BLOCK, ROOT, free_port, max_model_len, policy_dir, stop_process_group, wait_healthy,
)

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    model = policy_dir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    log = tmp_path_factory.mktemp("plain-vllm") / "server.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", model,
             "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "plain",
             "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20), "--block-size", str(BLOCK),
             "--max-model-len", str(max_model_len(model)), "--max-num-seqs", "8"],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, log)
        yield url
    finally:
        stop_process_group(process)


def completion(url: str, **fields) -> httpx.Response:
    body = {"model": "plain", "prompt": "<s>Q: 512+377+804=?\n<think>", "max_tokens": 60,
            "temperature": 0, **fields}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


@pytest.mark.parametrize("fields", [{"ttc": {"max_think": -5}}, {"ttc": {"max_think": 8}},
                                    {"ttc": {"search": {"strategy": "majority"}}},
                                    {"vllm_xargs": {"ttc_search": "{}"}}],
                         ids=["bad_budget", "budget", "search", "reserved_xarg"])
def test_ttc_without_the_controller_is_a_400_that_says_how_to_enable_it(plain_server, fields):
    r = completion(plain_server, **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "ttc" and "VLLM_PLUGINS" in error["message"] \
        and "ttc-vllm serve" in error["message"]


def test_plain_requests_and_the_logits_processor_still_work(plain_server):
    plain = completion(plain_server)
    assert plain.status_code == 200
    capped = completion(plain_server, vllm_xargs={"ttc": json.dumps({"max_think": 8, "conclusion": None})},
                        return_token_ids=True)
    assert capped.status_code == 200, capped.text
    text = capped.json()["choices"][0]["text"]
    assert "</think>" in text and len(text.split("</think>")[0]) <= 8   # testbed: 1 char per token
    bad = completion(plain_server, vllm_xargs={"ttc": json.dumps({"max_think": -5})})
    assert bad.status_code == 400 and "max_think" in bad.text   # the processor's validate_params
