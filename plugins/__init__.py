"""Everything vLLM loads from ttc-vllm, importable as `ttc_vllm_plugins`.

vLLM imports this package in every process through the `vllm.general_plugins` entry point;
the logits processors are registered through `vllm.logits_processors`.
"""


def register() -> None:
    """vLLM general-plugin hook, run in every process. It puts the KV-accounting mixin on
    the scheduler the engine core builds (ttc_vllm_plugins/kv_accounting.py), and in the API
    server of a plain `vllm serve` (ttc-vllm installed, its endpoint plugin not allowlisted)
    it makes a `ttc` body field a 400 that says how to enable it, instead of silently
    ignored."""
    from ttc_vllm_plugins import kv_accounting, vllm_compat

    kv_accounting.install()
    vllm_compat.after_endpoint_plugins(_refuse_unserved_ttc)


def _refuse_unserved_ttc(app) -> None:
    from ttc_vllm_plugins.controller import TTCNotEnabledMiddleware, controller_attached

    if not controller_attached(app):
        app.add_middleware(TTCNotEnabledMiddleware)
