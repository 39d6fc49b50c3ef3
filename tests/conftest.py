"""Shared fixtures. One policy engine per test session: engine start costs 20-50 s here."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest


def policy_dir() -> Path:
    from ttc_vllm.testbed import policy_path

    return Path(os.environ.get("TTC_VLLM_POLICY", policy_path()))


@pytest.fixture(scope="session")
def kv_peak_file(tmp_path_factory) -> Path:
    """Where the session engine's KVAccountingScheduler records its peak KV blocks."""
    return tmp_path_factory.mktemp("kv") / "peak.json"


@pytest.fixture(scope="session")
def llm(kv_peak_file):
    """The shipped testbed policy in a real vLLM engine, with the ttc-vllm logits processor
    and ttc-vllm's KV-accounting mixin on vLLM's scheduler (installed by the general plugin),
    here also writing the engine-wide peak of blocks in use to a file."""
    from ttc_vllm.engine import make_llm
    from ttc_vllm_plugins.kv_accounting import PEAK_FILE_ENV

    os.environ[PEAK_FILE_ENV] = str(kv_peak_file)  # read by the engine core process it spawns
    try:
        engine = make_llm(str(policy_dir()), kv_cache_memory_bytes=768 << 20, max_num_seqs=256)
    finally:
        os.environ.pop(PEAK_FILE_ENV, None)
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()


@pytest.fixture(scope="session")
def tokenizer(llm):
    return llm.get_tokenizer()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real `ttc-vllm serve` per session (tests/live_server.py)."""
    from tests.live_server import start_server

    yield from start_server(tmp_path_factory)


@pytest.fixture(scope="session")
def client(server):
    from tests.live_server import make_client

    return make_client(server)
