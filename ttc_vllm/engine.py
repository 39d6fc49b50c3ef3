"""The one adapter between ttc-vllm and a vLLM engine (offline `LLM`).

Everything else in `ttc_vllm` talks to vLLM through here, so engine defaults for CPU
machines (explicit KV bytes, eager mode, small blocks so short traces hit the prefix cache)
live in one place. vLLM is imported lazily: importing this module stays cheap.
"""
from __future__ import annotations

import os
from typing import Any

# CPU-friendly defaults; every one can be overridden by the caller (GPU users usually do).
CPU_ENGINE_DEFAULTS: dict[str, Any] = {
    "enforce_eager": True,
    "kv_cache_memory_bytes": 1 << 30,
    "block_size": 32,  # CPU attention needs a multiple of 32 for this model
    "max_model_len": 512,
    "enable_prefix_caching": True,
    "seed": 0,
}


def on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch comes with vllm
        return True


# A model's config.json may demand the dtype it must run in (the testbed PRM, whose compiled
# circuit overflows float16, sets it); engines built for it honour it.
REQUIRED_DTYPE_KEY = "ttc_vllm_required_dtype"
# The logits processor, named as `--logits-processors` names it: the library never imports
# the plugins package; vLLM loads the class from this name.
LOGITS_PROCESSOR = "ttc_vllm_plugins.logits:TTCLogitsProcessor"


def engine_kwargs(model: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` of `model`, with CPU defaults on CPU."""
    if not model:   # str(None) would send vLLM to the hub for a model named "None"
        raise ValueError("a model (directory or hub id) is required")
    kwargs: dict[str, Any] = {"model": str(model)}
    if on_cpu():
        kwargs.update(CPU_ENGINE_DEFAULTS)
    if "TTC_VLLM_KV_BYTES" in os.environ:
        kwargs["kv_cache_memory_bytes"] = int(os.environ["TTC_VLLM_KV_BYTES"])
    kwargs.update(overrides)
    return kwargs


def make_llm(model: str, **overrides: Any):
    """A `vllm.LLM` of `model` with the ttc-vllm logits processor registered explicitly.

    Passing the processor class (not only the entry point) matters on GPU with async
    scheduling: explicitly given processors get real token ids instead of -1 placeholders.
    """
    from vllm import LLM

    kwargs = engine_kwargs(model, **overrides)
    kwargs.setdefault("logits_processors", [LOGITS_PROCESSOR])
    return LLM(**kwargs)
