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
def llm():
    """The shipped testbed policy in a real vLLM engine, with the ttc-vllm logits processor."""
    from ttc_vllm.engine import make_llm

    engine = make_llm(str(policy_dir()), kv_cache_memory_bytes=768 << 20, max_num_seqs=256)
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()


@pytest.fixture(scope="session")
def tokenizer(llm):
    return llm.get_tokenizer()
