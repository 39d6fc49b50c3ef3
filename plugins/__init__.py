"""Everything vLLM loads from ttc-vllm, importable as `ttc_vllm_plugins`.

vLLM imports this package in every process through the `vllm.general_plugins` entry point;
the logits processors are registered through `vllm.logits_processors`.
"""


def register() -> None:
    """vLLM general-plugin hook: nothing to patch today; importing is enough."""
