"""The testbed: a verifiable reasoning task and the tiny policy/PRM trained on it."""
from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"


def policy_path() -> Path:
    """Directory of the shipped testbed policy (HF format, loadable by vLLM)."""
    return WEIGHTS / "policy"


def prm_path() -> Path:
    """Directory of the shipped testbed process reward model."""
    return WEIGHTS / "prm"
