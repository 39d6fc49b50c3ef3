"""The per-request options reference (`ttc_vllm/OPTIONS.md`), generated from the models.

`ttc-vllm options-reference` prints it; `tests/test_docs.py` fails when the committed file
differs from what this module generates. Types, defaults, bounds (ge / le / gt / lt,
lengths), strictness and Literal choices come from the pydantic field metadata of
`TTCOptions` and the models it nests; a field's `description=` is used as written. Where a
field has none, `FALLBACK` below supplies the text (`missing_descriptions()` lists those
fields), and `RULES` adds what validators and the server check across fields, which no field
metadata states.

Pure: imports only the option models and the limits they share.
"""
from __future__ import annotations

import inspect
import json
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, Strict
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ttc_vllm.limits import MAX_TOKENS
from ttc_vllm.options import EXTRA_ARGS_KEY, TTCOptions
from ttc_vllm.search import options as search_options

COMMAND = "ttc-vllm options-reference > ttc_vllm/OPTIONS.md"

# Descriptions for fields declared without `description=` (keyed by option path). A
# description added to the model replaces the text here.
FALLBACK: dict[str, str] = {
    "ttc.budget_tokens": "Anthropic's `budget_tokens` / Gemini's `thinking_budget`: another name for "
                         "`max_think` (both set and different: an error)",
    "ttc.reasoning_effort": "maps to `max_think` through a per-model table (`TTC_VLLM_EFFORT_TABLE`; "
                            "testbed: 0/32/96/256, Qwen3/R1: 0/1k/4k/16k); OpenAI's top-level "
                            "`reasoning_effort` sets it too",
    "ttc.conclusion": "forced token by token, then `</think>`, when a budget or halting ends thinking",
    "ttc.answer_prefix": "s1's \"Final Answer:\": forced right after the `</think>` of a forced "
                         "conclusion, so a cut trace answers instead of thinking on (testbed: "
                         "`\"\\nAnswer: \"`); a natural `</think>` is left alone; unset leaves the "
                         "answer to the model",
    "ttc.continuation": "injected when the model tries to stop before `min_think`",
    "ttc.halting": "log-prob confidence halting, see [ttc.halting](#ttchalting)",
    "ttc.search": "server-side search (or in jobs), see [ttc.search](#ttcsearch)",
    "ttc.halting.signal": "per-token signal: `token_confidence` (DeepConf: −mean top-k log-prob, ≥ 0), "
                          "`group_confidence` (its window mean, ≥ 0), `entropy` (as −H, ≤ 0), "
                          "`sampled_margin` (log p(sampled token) − log p(top token), ≤ 0)",
    "ttc.halting.aggregate": "f in the rule f(v_t) > τ: `tail` = mean of the last `window` tokens, "
                             "`mean` = running mean, `min` = running min",
    "ttc.halting.threshold": "τ: a number, or the name of an entry of `ttc-vllm calibrate`'s file "
                             "(`TTC_VLLM_CALIBRATION`), whose signal settings then apply",
    "ttc.halting.direction": "`above`: TS-DTP, halt when confident (f(v_t) > τ); `below`: DeepConf "
                             "online, halt weak traces (f(v_t) < τ)",
    "ttc.halting.action": "`conclude`: force the conclusion, then the model answers; `stop`: end the "
                          "trace (a vote discards it)",
    "ttc.search.strategy": "search strategy (one file each under `ttc_vllm/search/`)",
    "ttc.search.n": "traces sampled (majority / weighted_vote / best_of_n); candidates per step "
                    "(beam / dvts); finished traces sought (mcts)",
    "ttc.search.beam_width": "children per expanded node (beam, dvts, mcts)",
    "ttc.search.max_steps": "search depth: steps per trace",
    "ttc.search.max_step_tokens": "tokens per step",
    "ttc.search.temperature": "sampling temperature of candidates",
    "ttc.search.top_p": "nucleus sampling of candidates",
    "ttc.search.aggregation": "PRM step scores → trace score: `min` (weakest step), `prod`, `mean`, `last`",
    "ttc.search.step_delimiter": "where a step ends; unset: the server's default (the `<step>` token if "
                                 "the tokenizer has one, else `\"\\n\\n\"`; `TTC_VLLM_STEP_DELIMITER`)",
    "ttc.search.mcts": "MCTS settings, see [ttc.search.mcts](#ttcsearchmcts)",
    "ttc.search.truncate": "in-flight truncation of weak candidates, see "
                           "[ttc.search.truncate](#ttcsearchtruncate)",
    "ttc.search.adaptive": "adaptive sampling in waves, see [ttc.search.adaptive](#ttcsearchadaptive)",
    "ttc.search.mcts.c_puct": "PUCT exploration weight",
    "ttc.search.mcts.rollouts": "select-expand-backpropagate iterations",
    "ttc.search.truncate.after_steps": "steps every candidate takes before the weak ones are dropped",
    "ttc.search.truncate.keep_ratio": "share of the unfinished candidates kept",
    "ttc.search.truncate.by": "`prm`: rank by aggregated PRM step scores; `confidence`: by the trace's "
                              "lowest step confidence (token log-probs, no PRM)",
    "ttc.search.adaptive.waves": "traces per wave; unset: waves of 4 (the last one smaller)",
    "ttc.search.adaptive.consensus": "share of the votes the leading answer must hold for sampling to stop",
    "ttc.search.adaptive.min_votes": "answered traces needed before sampling may stop",
    "ttc.search.adaptive.exit_votes": "what the consensus counts: `weighted` (the traces' PRM scores) or "
                                      "`counted` (one vote per answered trace); unset: weighted for "
                                      "weighted_vote, counted for majority",
}

# What validators and the server check beyond a field's own metadata (keyed by option path).
RULES: dict[str, str] = {
    "ttc.max_think": "The server also refuses one above `max_tokens` (else above the model's "
                     "context) and one between 1 and the conclusion's length in tokens.",
    "ttc.min_think": "≤ `max_think`. Below it `</think>` and EOS are suppressed; an attempt to stop "
                     "injects `continuation`.",
    "ttc.answer_reserve": "With `max_tokens` set, thinking concludes early enough that this many "
                          "tokens remain; the server refuses a reserve that leaves no room to think.",
    "ttc.answer_prefix": "The server refuses one longer than `answer_reserve`.",
    "ttc.halting": "Refused with a step-wise search strategy (beam, dvts, mcts): its window would "
                   "restart at every step.",
    "ttc.halting.threshold": "A negative τ for a confidence signal (or a positive one for `entropy`, "
                             "`sampled_margin`) is refused.",
    "ttc.search.n": f"≤ the server's ceiling `{search_options.MAX_N_ENV}` "
                    f"(default {search_options.DEFAULT_MAX_N}), read when the request is validated.",
    "ttc.search.beam_width": "Must divide `n` for beam and dvts.",
    "ttc.search.truncate": "Only with majority, weighted_vote, best_of_n; not with `adaptive`.",
    "ttc.search.adaptive": "Only with majority, weighted_vote; not with `truncate`.",
    "ttc.search.truncate.after_steps": "< `max_steps`.",
    "ttc.search.adaptive.waves": "Every wave ≥ 1; the waves sum to `n`.",
    "ttc.search.adaptive.exit_votes": "`weighted` needs strategy weighted_vote.",
}

HEADER = f"""# Per-request options reference

<!-- Generated by `{COMMAND}` from the pydantic models in
ttc_vllm/options.py and ttc_vllm/search/options.py. Do not edit by hand: tests/test_docs.py
fails when this file differs from what the command prints. -->

Every request is validated once by `ttc_vllm.options.TTCOptions`. Send the options as:
- HTTP (`vllm serve` / `ttc-vllm serve`): a `{EXTRA_ARGS_KEY}` object in the request body (the OpenAI
  client's `extra_body={{"{EXTRA_ARGS_KEY}": {{...}}}}`) and/or OpenAI's top-level `reasoning_effort`;
- offline (`vllm.LLM`): `SamplingParams(extra_args={{"{EXTRA_ARGS_KEY}": {{...}}}})`;
- raw vLLM HTTP without the controller plugin: `vllm_xargs={{"{EXTRA_ARGS_KEY}": json.dumps({{...}})}}`
  (vLLM only accepts flat values there; `TTCOptions(...).to_extra_args()` builds it);
- jobs: `ttc-vllm job evaluate --controls JSON` (thinking controls for every sampled trace).

Unknown fields, wrong types and out-of-range values fail with the option's path in the
message (`ttc.halting.threshold: ...`): an HTTP 400, or `ValueError` offline.

**strict**: no coercion: `true` or `"40"` for a number is an error, and so is `40.0` for an
integer.
Token counts stop at 2²⁴ (`ttc_vllm/limits.py`). *Rules* are checked across fields by the
models' validators or by the server; no field metadata states them.
"""


def _number(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v == MAX_TOKENS:
        return "2²⁴"
    return repr(v) if isinstance(v, float) else str(v)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The options model a field nests (directly or as `Model | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        models = [m for m in map(_model_of, get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


def _describe_type(annotation: Any, metadata: list[Any]) -> tuple[str, bool]:
    """(type text, optional) of an annotation; constraints found inside `Annotated` are
    appended to `metadata`."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        optional = len(args) < len(get_args(annotation))
        texts = [_describe_type(a, metadata)[0] for a in args]
        return " or ".join(texts), optional
    if origin is typing.Annotated:
        base, *extra = get_args(annotation)
        for item in extra:
            if isinstance(item, FieldInfo):
                metadata.extend(item.metadata)
            else:
                metadata.append(item)
        return _describe_type(base, metadata)
    if origin is Literal:
        return " \\| ".join(f"`{json.dumps(c)}`" for c in get_args(annotation)), False
    if origin is tuple:
        args = get_args(annotation)
        inner: list[Any] = []
        text = _describe_type(args[0], inner)[0]
        strict = " (strict)" if any(isinstance(m, Strict) and m.strict for m in inner) else ""
        return f"list of {text}{strict}", False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object", False
    if isinstance(annotation, type):
        return annotation.__name__, False
    return str(annotation), False


def _bounds(metadata: list[Any], type_text: str) -> tuple[list[str], bool]:
    """(bounds as text, strict) from annotated-types constraints and Strict markers."""
    bounds, strict = [], False
    lengths: list[int | None] = [None, None]   # min_length, max_length
    unit = " chars" if type_text.startswith("str") else " items" if type_text.startswith("list") else ""
    for m in metadata:
        if isinstance(m, Strict):
            strict = strict or m.strict
        elif isinstance(m, at.Ge):
            bounds.append(f"≥ {_number(m.ge)}")
        elif isinstance(m, at.Gt):
            bounds.append(f"> {_number(m.gt)}")
        elif isinstance(m, at.Le):
            bounds.append(f"≤ {_number(m.le)}")
        elif isinstance(m, at.Lt):
            bounds.append(f"< {_number(m.lt)}")
        elif isinstance(m, at.MinLen):
            lengths[0] = m.min_length
        elif isinstance(m, at.MaxLen):
            lengths[1] = m.max_length
    order = {"≥": 0, ">": 0, "≤": 1, "<": 1}
    bounds.sort(key=lambda b: order.get(b[0], 2))
    low, high = lengths
    if low is not None and high is not None:
        bounds.append(f"{low}–{high}{unit}")
    elif high is not None:
        bounds.append(f"≤ {high}{unit}")
    elif low is not None:
        bounds.append("non-empty" if low == 1 else f"≥ {low}{unit}")
    return bounds, strict


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if value is None or value is PydanticUndefined:
        return "unset"
    if isinstance(value, BaseModel):
        return "defaults below"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped."""
    return re.sub(r"(?<!\\)\|", r"\\|", " ".join(text.split()))


def _anchor(path: str) -> str:
    return path.replace(".", "").lower()


def _sections(model: type[BaseModel], path: str) -> list[tuple[str, type[BaseModel]]]:
    """(path, model) of `model` and every model nested in it, depth first."""
    out = [(path, model)]
    for name, field in model.model_fields.items():
        nested = _model_of(field.annotation)
        if nested is not None:
            out.extend(_sections(nested, f"{path}.{name}"))
    return out


def _rows(model: type[BaseModel], path: str) -> list[str]:
    rows = ["| option | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        option = f"{path}.{name}"
        metadata = list(field.metadata)
        type_text, optional = _describe_type(field.annotation, metadata)
        bounds, strict = _bounds(metadata, type_text)
        nested = _model_of(field.annotation)
        if nested is not None:
            type_text = f"object ([{option}](#{_anchor(option)}))"
        if strict:
            type_text += " (strict)"
        if optional:
            type_text += " or null"
        aliases = []
        alias = field.validation_alias
        if alias is not None:
            choices = getattr(alias, "choices", [alias])
            aliases = [c for c in choices if isinstance(c, str) and c != name]
        label = f"`{option}`" + "".join(f"<br>(also `{path}.{a}`)" for a in aliases)
        text = field.description or FALLBACK.get(option, "")
        if option in RULES:
            text = f"{text}. *Rule:* {RULES[option]}" if text else f"*Rule:* {RULES[option]}"
        rows.append(f"| {label} | {type_text} | {_default(field)} | {', '.join(bounds)} | {_cell(text)} |")
    return rows


def _intro(model: type[BaseModel]) -> str:
    doc = model.__doc__
    if model is search_options.SearchOptions and not doc:
        doc = search_options.__doc__.split("\n\n", 1)[1]   # the module's rules paragraph
    if not doc:
        return ""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def generate() -> str:
    """The whole reference, as committed in ttc_vllm/OPTIONS.md."""
    parts = [HEADER.rstrip("\n")]
    sections = _sections(TTCOptions, EXTRA_ARGS_KEY)
    parts.append("Sections: " + ", ".join(f"[{p}](#{_anchor(p)})" for p, _ in sections) + ".")
    for path, model in sections:
        parts.append(f"## {path}")
        intro = _intro(model)
        parts.append(f"`{model.__module__}.{model.__name__}`" + (f". {intro}" if intro else ""))
        parts.append("\n".join(_rows(model, path)))
    return "\n\n".join(parts) + "\n"


def missing_descriptions() -> list[str]:
    """Option paths whose field has no `description=` (their text comes from FALLBACK)."""
    missing = []
    for path, model in _sections(TTCOptions, EXTRA_ARGS_KEY):
        missing += [f"{path}.{n}" for n, f in model.model_fields.items() if not f.description]
    return missing
