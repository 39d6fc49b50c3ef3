"""The testbed: a verifiable reasoning task and the tiny policy/PRM trained on it."""
import os
from pathlib import Path

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
