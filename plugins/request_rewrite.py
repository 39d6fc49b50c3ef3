"""How the sampling controller reads an OpenAI request body (pure: no vLLM, no HTTP).

A request asks for test-time compute with a `ttc` object in its body (what the OpenAI client
sends with `extra_body={"ttc": {...}}`), with the same object JSON-encoded in
`vllm_xargs.ttc`, or with the OpenAI `reasoning_effort` field. `plan_request` validates it
through `TTCOptions` (and `SearchOptions`) and decides:

- "pass": nothing to do; the original bytes go to vLLM untouched;
- "single": per-trace controls (budgets, effort, halting); the body is rewritten so the
  options travel in `vllm_xargs={"ttc": "<json>"}` to the logits processor and the request
  continues through vLLM's own handler (streaming, parsers and errors unchanged);
- "search": a search strategy; the options travel in `vllm_xargs.ttc_search`, where the
  controller's engine-client wrapper picks them up and runs the search server-side.

Anything invalid raises `RequestRejected(param, message)` with `param` the dotted field
name (`ttc.max_think`, `ttc.search.n`, `n`, ...) and a message that starts with it.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from ttc_vllm.budget import EFFORT_LEVELS, output_limit
from ttc_vllm.options import DEFAULT_CONCLUSION, EXTRA_ARGS_KEY, TTCOptions
from ttc_vllm.search.options import SearchOptions

TTC_FIELD = "ttc"
XARGS_FIELD = "vllm_xargs"
SEARCH_XARG = "ttc_search"  # vllm_xargs key the search wrapper reads; reserved
EFFORT_FIELD = "reasoning_effort"

# The `ttc` object is small; anything bigger is junk (or an attempt to burn CPU in the
# validator) and is refused before validation.
MAX_TTC_JSON_BYTES = 16 * 1024
MAX_TTC_DEPTH = 6

# OpenAI/vLLM effort levels that budget.py has no table row for, and the row that serves
# them. (budget.py: none / low / medium / high.)
EFFORT_ALIASES = {"minimal": "low", "xhigh": "high", "max": "high"}

# Body fields a server-side search cannot honour: it returns one chosen trace, without
# log-probs, built by its own sampling loop.
SEARCH_INCOMPATIBLE = {
    "use_beam_search": "is not supported with ttc.search (the search is the decoding)",
    "logprobs": "is not available with ttc.search (the chosen trace has no log-probs)",
    "top_logprobs": "is not available with ttc.search (the chosen trace has no log-probs)",
    "prompt_logprobs": "is not available with ttc.search",
    "echo": "is not supported with ttc.search",
    "best_of": "is not supported with ttc.search (use ttc.search.n)",
}

# Byte patterns whose absence proves a body carries no TTC request: the quoted keys (a
# model named "ttc-testbed" does not match); `\\u`, which catches keys written with JSON
# escapes; `"ttc_search"` the reserved vllm_xargs key; a NUL byte, which every UTF-16 / UTF-32
# body holds (JSON allows them, and both vLLM and json.loads accept them).
_MARKERS = (b'"ttc"', b'"reasoning_effort"', b"\\u", b'"ttc_search"', b"\x00")

# The per-request work ceiling on a search: prompts x candidates x steps (see
# SearchOptions.work_per_prompt); 4096 = one prompt's beam search of n=64 over 64 steps.
DEFAULT_MAX_SEARCH_WORK = 4096


class RequestRejected(ValueError):
    """A 400: `param` is the offending field, `message` names it too."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class ServerLimits:
    """What the server can do; decided at start-up, not by requests."""

    has_prm: bool = False
    search_enabled: bool = True  # False when no engine client could be wrapped
    map_reasoning_effort: bool = True
    max_model_len: int | None = None   # the served context: no budget may exceed it
    max_search_work: int = DEFAULT_MAX_SEARCH_WORK
    # The engine's tokenizer (token ids of the conclusion / answer prefix, whose lengths
    # decide whether a cap can hold them); None: those checks are left to the engine.
    encode: Callable[[str], Sequence[int]] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Plan:
    kind: Literal["pass", "single", "search"]
    body: dict[str, Any] | None = None  # the rewritten body ("single", "search")
    options: TTCOptions | None = None
    search: SearchOptions | None = None


PASS = Plan("pass")


def might_carry_ttc(raw: bytes) -> bool:
    """False when the raw body certainly holds no TTC request (skips parsing JSON twice)."""
    return any(marker in raw for marker in _MARKERS)


def parse_body(raw: bytes) -> Any:
    """The JSON body, or None when it is not valid JSON (vLLM reports that itself).

    RequestRejected for what Python's parser cannot take at all: nesting deeper than its
    recursion limit, integers longer than its digit limit."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    except RecursionError:
        raise RequestRejected("body", "body: JSON nested too deeply") from None
    except ValueError:  # int() digit limit ("Exceeds the limit (4300 digits) ...")
        raise RequestRejected("body", "body: a JSON number with too many digits") from None


def carries_ttc(body: Any) -> bool:
    """Whether a parsed body asks for TTC options (on an endpoint that cannot serve them)."""
    if not isinstance(body, dict):
        return False
    xargs = body.get(XARGS_FIELD)
    return body.get(TTC_FIELD) is not None or (
        isinstance(xargs, dict) and (EXTRA_ARGS_KEY in xargs or SEARCH_XARG in xargs))


def plan_request(body: Any, limits: ServerLimits = ServerLimits()) -> Plan:
    """What to do with a parsed JSON request body (see the module docstring)."""
    if not isinstance(body, dict):
        return PASS  # not ours to judge: vLLM answers malformed bodies itself
    raw, source = _raw_options(body)
    effort = _top_level_effort(body, limits)
    if raw is None and effort is None:
        return PASS
    if body.get(XARGS_FIELD) is not None and not isinstance(body[XARGS_FIELD], dict):
        raise RequestRejected(XARGS_FIELD, f"{XARGS_FIELD}: expected an object, got "
                                           f"{_type_name(body[XARGS_FIELD])}")
    options = _validate_options(raw if raw is not None else {}, source)
    search = _search_options(options, source)
    if effort is not None:
        options = _apply_effort(options, effort, body[EFFORT_FIELD], source)
    _check_budgets(body, options, source, limits)
    if search is not None:
        _check_search_request(body, search, source, limits)
        xargs = {SEARCH_XARG: _search_payload(search)}
        # the thinking controls go to every engine request the search makes
        controls = options.sample_controls()
        if controls is not None:
            xargs[EXTRA_ARGS_KEY] = controls
        return Plan("search", _rewrite(body, xargs), options, search)
    return Plan("single", _rewrite(body, options.to_extra_args()), options)


def error_body(err: RequestRejected) -> dict[str, Any]:
    """OpenAI error format, as vLLM writes it."""
    return {"error": {"message": err.message, "type": "BadRequestError",
                      "param": err.param, "code": 400}}


# -- reading ---------------------------------------------------------------------------------

def _raw_options(body: dict[str, Any]) -> tuple[Any, str]:
    """(the raw ttc object or None, the field it came from)."""
    xargs = body.get(XARGS_FIELD)
    in_xargs = isinstance(xargs, dict) and EXTRA_ARGS_KEY in xargs
    if isinstance(xargs, dict) and SEARCH_XARG in xargs:
        raise RequestRejected(f"{XARGS_FIELD}.{SEARCH_XARG}",
                              f"{XARGS_FIELD}.{SEARCH_XARG}: reserved for the server; "
                              f"send search options as ttc.search")
    raw = body.get(TTC_FIELD)
    if raw is not None:
        if in_xargs:
            raise RequestRejected(TTC_FIELD, f"{TTC_FIELD}: sent both as the ttc object and "
                                             f"in {XARGS_FIELD}.{EXTRA_ARGS_KEY}; send one")
        if xargs is not None and not isinstance(xargs, dict):
            raise RequestRejected(XARGS_FIELD, f"{XARGS_FIELD}: expected an object, got "
                                               f"{_type_name(xargs)}")
        return raw, TTC_FIELD
    if not in_xargs:
        return None, TTC_FIELD
    source = f"{XARGS_FIELD}.{EXTRA_ARGS_KEY}"
    encoded = xargs[EXTRA_ARGS_KEY]
    if not isinstance(encoded, str):
        raise RequestRejected(source, f"{source}: expected the options as a JSON string, got "
                                      f"{_type_name(encoded)}")
    if len(encoded) > MAX_TTC_JSON_BYTES:
        raise RequestRejected(source, f"{source}: {len(encoded)} bytes; the limit is "
                                      f"{MAX_TTC_JSON_BYTES}")
    try:
        return json.loads(encoded), source
    except json.JSONDecodeError as e:
        raise RequestRejected(source, f"{source}: not valid JSON ({e.msg} at {e.pos})") from None


def _top_level_effort(body: dict[str, Any], limits: ServerLimits) -> str | None:
    """The budget.py level for the OpenAI `reasoning_effort`, or None (absent, mapping
    off, or a value vLLM itself will reject with its own 400)."""
    value = body.get(EFFORT_FIELD)
    if value is None or not limits.map_reasoning_effort or not isinstance(value, str):
        return None
    level = EFFORT_ALIASES.get(value, value)
    return level if level in EFFORT_LEVELS else None


def _validate_options(raw: Any, source: str) -> TTCOptions:
    if not isinstance(raw, dict):
        raise RequestRejected(source, f"{source}: expected an object, got {_type_name(raw)}")
    _check_shape(raw, source)
    try:
        options = TTCOptions.model_validate(raw)
        options.resolved_halting()  # a named threshold must exist in the calibration file
        return options
    except ValidationError as e:
        raise _rejection(e, source) from None
    except ValueError as e:  # resolved_halting: "halting.threshold: ..."
        msg = str(e)
        field = msg.split(":", 1)[0] if ":" in msg else ""
        param = f"{source}.{field}" if field.startswith("halting") else source
        raise RequestRejected(param, f"{source}.{msg}" if param != source else f"{source}: {msg}")


def _search_options(options: TTCOptions, source: str) -> SearchOptions | None:
    raw = options.search
    if raw is None or isinstance(raw, SearchOptions):
        return raw
    where = f"{source}.search"
    if not isinstance(raw, dict):
        raise RequestRejected(where, f"{where}: expected an object, got {_type_name(raw)}")
    try:
        return SearchOptions.model_validate(raw)
    except ValidationError as e:
        raise _rejection(e, where) from None
    except ValueError as e:  # e.g. a malformed TTC_VLLM_MAX_N on the server
        raise RequestRejected(where, f"{where}: {e}") from None


def _check_shape(raw: Any, source: str) -> None:
    """Refuse deep nesting and oversized objects before pydantic walks them."""
    size = len(json.dumps(raw, separators=(",", ":"), default=str))
    if size > MAX_TTC_JSON_BYTES:
        raise RequestRejected(source, f"{source}: {size} bytes of options; the limit is "
                                      f"{MAX_TTC_JSON_BYTES}")
    stack = [(raw, 0, source)]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_TTC_DEPTH:
            raise RequestRejected(path, f"{path}: nested deeper than {MAX_TTC_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1, f"{path}.{k}") for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, depth + 1, f"{path}.{i}") for i, v in enumerate(value))


def _rejection(err: ValidationError, prefix: str) -> RequestRejected:
    parts, first = [], None
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]))
        first = first or loc
        parts.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    return RequestRejected(first or prefix, "; ".join(parts))


# -- request-level rules ---------------------------------------------------------------------

def _apply_effort(options: TTCOptions, level: str, sent: str, source: str) -> TTCOptions:
    """Top-level reasoning_effort sets the effort unless the ttc object already decided:
    an explicit max_think wins (budget.py rule); a different explicit effort conflicts."""
    if options.reasoning_effort is not None:
        if options.reasoning_effort != level:
            raise RequestRejected(f"{source}.reasoning_effort",
                                  f"{source}.reasoning_effort: {options.reasoning_effort!r} "
                                  f"conflicts with the top-level reasoning_effort {sent!r}; "
                                  f"send one")
        return options
    if options.max_think is not None:
        return options
    return options.model_copy(update={"reasoning_effort": level})


def _max_tokens(body: dict[str, Any]) -> tuple[str, int] | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return name, value
    return None


def _check_budgets(body: dict[str, Any], options: TTCOptions, source: str,
                   limits: ServerLimits) -> None:
    """Budgets that contradict the request or the model are refused, not clipped silently:
    a thinking budget larger than the output allowance (max_tokens, else the model's
    context), an answer reserve that leaves no room to think, a cap too small to hold the
    conclusion that ends thinking at it, an answer prefix longer than the answer reserve."""
    limit = _max_tokens(body)
    if limit is None and limits.max_model_len is not None:
        limit = ("the model's context", limits.max_model_len)
    if limit is not None:
        name, value = limit
        for field_name in ("max_think", "min_think"):
            budget = getattr(options, field_name)
            if budget is not None and budget > value:
                shown = _sent_name(options, field_name)
                raise RequestRejected(f"{source}.{shown}",
                                      f"{source}.{shown}: {budget} exceeds {name} ({value})")
        if "answer_reserve" in options.model_fields_set and output_limit(value, options.answer_reserve) == 0:
            raise RequestRejected(f"{source}.answer_reserve",
                                  f"{source}.answer_reserve: {options.answer_reserve} leaves no "
                                  f"room to think within {name} ({value})")
    if limits.encode is None:
        return
    conclusion = options.conclusion if "conclusion" in options.model_fields_set else DEFAULT_CONCLUSION
    cap = options.max_think
    if cap and conclusion:
        length = len(limits.encode(conclusion))
        if cap < length:
            shown = _sent_name(options, "max_think")
            raise RequestRejected(
                f"{source}.{shown}",
                f"{source}.{shown}: {cap} cannot hold the conclusion that ends thinking at the "
                f"cap ({length} tokens); send at least {length}, 0 for no thinking, or a "
                f"shorter {source}.conclusion")
    if options.answer_prefix and _max_tokens(body) is not None:
        length = len(limits.encode(options.answer_prefix))
        if length > options.answer_reserve:
            raise RequestRejected(
                f"{source}.answer_prefix",
                f"{source}.answer_prefix: {length} tokens do not fit the answer reserve "
                f"({options.answer_reserve}); raise {source}.answer_reserve")


def _sent_name(options: TTCOptions, field_name: str) -> str:
    """budget_tokens (alias thinking_budget) is copied into max_think: name what was sent."""
    return "budget_tokens" if field_name == "max_think" and options.budget_tokens is not None \
        else field_name


def _check_search_request(body: dict[str, Any], search: SearchOptions, source: str,
                          limits: ServerLimits) -> None:
    if not limits.search_enabled:
        raise RequestRejected(f"{source}.search", f"{source}.search: server-side search is not "
                                                  f"available on this server")
    work = _prompt_count(body) * search.work_per_prompt
    if work > limits.max_search_work:
        raise RequestRejected(
            f"{source}.search",
            f"{source}.search: {work} units of work (prompts x candidates x steps) exceed this "
            f"server's per-request ceiling of {limits.max_search_work} (set by "
            f"TTC_VLLM_MAX_SEARCH_WORK); lower n, max_steps or rollouts, or send fewer prompts")
    if search.needs_scorer and not limits.has_prm:
        raise RequestRejected(
            f"{source}.search.strategy",
            f"{source}.search.strategy: {search.strategy!r} needs a process reward model and "
            f"this server has none (start it with TTC_VLLM_PRM=...); 'majority' needs none")
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestRejected("n", f"n: must be 1 with ttc.search (got {n!r}); the number of "
                                   f"sampled traces is ttc.search.n")
    for name, why in SEARCH_INCOMPATIBLE.items():
        if _asks_for(name, body.get(name)):
            raise RequestRejected(name, f"{name}: {why}")


def _prompt_count(body: dict[str, Any]) -> int:
    """Prompts of a completions body (a list of strings or of token-id lists); chat: 1."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def _asks_for(field: str, value: Any) -> bool:
    """Whether a body field requests the feature (completions' logprobs=0 still asks for
    the sampled token's log-prob; top_logprobs=0 asks for nothing)."""
    if value is None or value is False:
        return False
    return not (value == 0 and field != "logprobs")


# -- writing ---------------------------------------------------------------------------------

def _search_payload(search: SearchOptions) -> str:
    return json.dumps(search.model_dump(mode="json"), separators=(",", ":"))


def _rewrite(body: dict[str, Any], xargs_update: dict[str, str]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k != TTC_FIELD}
    xargs = dict(body.get(XARGS_FIELD) or {})
    xargs.pop(EXTRA_ARGS_KEY, None)
    xargs.update(xargs_update)
    out[XARGS_FIELD] = xargs
    return out


def search_options_from_xargs(extra_args: dict[str, Any] | None) -> SearchOptions | None:
    """The search options the middleware put in `vllm_xargs` (None: not a search)."""
    if not extra_args or SEARCH_XARG not in extra_args:
        return None
    return SearchOptions.model_validate_json(extra_args[SEARCH_XARG])


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                         type(value).__name__)
