"""The PRM of server-side search, from start-up configuration only.

Requests never name a PRM: an endpoint that dialled URLs from request bodies would be an
SSRF hole. The operator picks one with environment variables when starting the server:

- `TTC_VLLM_PRM`:
  - unset or empty: no PRM (majority voting still works; PRM strategies get a clear 400);
  - `ray://host:port`, `host:port`, `auto` or `local`: a `ttc_vllm.prm.pool.PRMPool` of
    Ray actors, each hosting the PRM of `TTC_VLLM_PRM_CONFIG` in a vLLM pooling engine;
  - `http://...` / `https://...`: a running vLLM pooling server of the PRM
    (`vllm serve PRM --runner pooling`), see `ttc_vllm_plugins.prm_http`;
  - `python:pkg.module:factory`: a zero-argument callable returning a StepScorer (custom
    scorers, and the testbed's exact checker
    `python:ttc_vllm.testbed.oracle_prm:OraclePRM` that the server tests use).
- `TTC_VLLM_PRM_CONFIG`: `ttc_vllm.prm.scorers.PRMConfig` as JSON (inline or a file path);
  default: the shipped testbed PRM.
- `TTC_VLLM_PRM_ACTORS`: Ray actors in the pool (default 1).
- `TTC_VLLM_RAY_HOST`: with `local`, the Ray head the server starts listens on loopback only
  (GCS, raylet, agents, metrics exporters and the PRM actors; default 127.0.0.1). Set it to
  an address of this machine to get Ray's own behaviour instead -- every port on every
  interface, that address advertised -- e.g. for other nodes to join. A cluster joined by
  address (`host:port`, `ray://`, `auto`) keeps its own configuration.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path
from typing import Any

PRM_ENV = "TTC_VLLM_PRM"
PRM_CONFIG_ENV = "TTC_VLLM_PRM_CONFIG"
PRM_ACTORS_ENV = "TTC_VLLM_PRM_ACTORS"


class PRMConfigError(ValueError):
    """The start-up PRM configuration is unusable (the server refuses to start)."""


def prm_config(source: str | None = None):
    """PRMConfig from JSON text or a JSON file path (default: the testbed PRM)."""
    from ttc_vllm.prm.scorers import PRMConfig
    from ttc_vllm.testbed import prm_scorer_config

    source = source if source is not None else os.environ.get(PRM_CONFIG_ENV, "")
    if not source.strip():
        return prm_scorer_config()
    text = source if source.lstrip().startswith("{") else Path(source).read_text()
    try:
        return PRMConfig.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValueError) as e:
        raise PRMConfigError(f"{PRM_CONFIG_ENV}: {e}") from None


def scorer_from_env(env: dict[str, str] | None = None, tokenizer=None) -> Any | None:
    """The StepScorer the environment configures, or None (see the module docstring).
    `tokenizer`: the policy's, for PRMs that share it (http scorer)."""
    env = os.environ if env is None else env
    spec = env.get(PRM_ENV, "").strip()
    if not spec:
        return None
    if spec.startswith("python:"):
        return _python_scorer(spec[len("python:"):])
    if spec.startswith(("http://", "https://")):
        from ttc_vllm_plugins.prm_http import HTTPPoolingPRM

        try:
            return HTTPPoolingPRM(spec, prm_config(env.get(PRM_CONFIG_ENV, "")), tokenizer)
        except ValueError as e:
            raise PRMConfigError(f"{PRM_ENV}: {e}") from None
    return _ray_pool(spec, env)


def _python_scorer(target: str):
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PRMConfigError(f"{PRM_ENV}: expected python:package.module:factory, got {target!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise PRMConfigError(f"{PRM_ENV}: cannot import {target!r}: {e}") from None
    try:
        scorer = factory()
    except Exception as e:
        raise PRMConfigError(f"{PRM_ENV}: {target!r} failed: {type(e).__name__}: {e}") from e
    if not callable(getattr(scorer, "score", None)):
        raise PRMConfigError(f"{PRM_ENV}: {target!r} returned {type(scorer).__name__}, "
                             "which has no score(traces) method")
    return scorer


def _ray_pool(spec: str, env: dict[str, str]):
    from ttc_vllm.prm.pool import PRMPool
    from ttc_vllm.prm.scorers import make_scorer

    raw_actors = env.get(PRM_ACTORS_ENV, "1")
    try:
        actors = int(raw_actors)
    except ValueError:
        raise PRMConfigError(f"{PRM_ACTORS_ENV}: expected a positive integer, got {raw_actors!r}") from None
    if actors < 1:
        raise PRMConfigError(f"{PRM_ACTORS_ENV}: expected a positive integer, got {raw_actors!r}")
    config = prm_config(env.get(PRM_CONFIG_ENV, ""))
    address = None if spec == "local" else spec
    # The factory runs inside each actor: a picklable partial, not a closure.
    return PRMPool(actors, functools.partial(make_scorer, config), address=address)
