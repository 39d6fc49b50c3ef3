"""The testbed: a verifiable reasoning task and the tiny policy/PRM trained on it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).parent / "weights"
CACHE_ENV = "TTC_VLLM_CACHE_DIR"


def policy_path() -> Path:
    """Directory of the shipped testbed policy (HF format, loadable by vLLM)."""
    return WEIGHTS / "policy"


def prm_recipe_path() -> Path:
    """What ships of the testbed PRM: config, tokenizer, training record, fitted score head."""
    return WEIGHTS / "prm"


def prm_path() -> Path:
    """Directory of the testbed process reward model, ready for vLLM. Its body is the policy
    compiled by `prm_circuit` (38 MiB of mostly zeros), so only the recipe ships and the full
    model is built once (a few seconds) into $TTC_VLLM_CACHE_DIR (default ~/.cache/ttc-vllm).
    A recipe directory holding its own model.safetensors is used as it is."""
    recipe = prm_recipe_path()
    if (recipe / "model.safetensors").exists():
        return recipe
    from ttc_vllm.testbed import prm_circuit

    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ttc-vllm")
    return prm_circuit.materialize(recipe, policy_path(), cache)


def prm_scorer_config(model: str | None = None, **overrides: Any):
    """The `PRMConfig` of the shipped testbed PRM (a Qwen2ForProcessRewardModel on the testbed
    tokenizer, pooled at the testbed's step tag); `model` replaces its directory."""
    from ttc_vllm.prm.scorers import PRMConfig
    from ttc_vllm.testbed.task import STEP_TAG

    values: dict[str, Any] = dict(kind="pooling", model=str(model or prm_path()),
                                  step_tag=STEP_TAG, good_label=1, input_format="token_ids")
    values.update(overrides)
    return PRMConfig(**values)
