"""The final answer of a completion, as voting compares it (pure).

Server-side search votes over answers of arbitrary models, so the rule is generic: look at
the text after the last end-of-thinking marker (the whole text if there is none) and take,
in order of preference, an "Answer: X" line (the testbed's format), the last \\boxed{X}
(math models), or else the last non-empty line. Whitespace is normalised so that answers
differing only in spacing vote together. `TTC_VLLM_ANSWER_REGEX` (one capture group)
replaces the rule for models with their own answer format.
"""
from __future__ import annotations

import os
import re

ANSWER_REGEX_ENV = "TTC_VLLM_ANSWER_REGEX"
THINK_START = "<think>"
THINK_END = "</think>"

_ANSWER_LINE = re.compile(r"Answer:\s*(.+)")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced (answers like \\frac{1}{2})."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None  # unbalanced: the trace was cut off inside the box


def _normalise(answer: str) -> str | None:
    answer = " ".join(answer.split())
    return answer or None


def compile_answer_regex(pattern: str | None) -> re.Pattern | None:
    """The configured answer pattern (None: the built-in rule); ValueError if it is unusable."""
    if not pattern:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{ANSWER_REGEX_ENV}: invalid regular expression ({e})") from None
    if regex.groups != 1:
        raise ValueError(f"{ANSWER_REGEX_ENV}: needs exactly one capture group, has {regex.groups}")
    return regex


def extract_final_answer(text: str, think_end: str = THINK_END, think_start: str = THINK_START,
                         regex: re.Pattern | None = None,
                         thinking_open: bool = False) -> str | None:
    """The answer a completion gives, or None if it gives none (e.g. cut off while thinking).

    A completion still inside its thinking block -- it opened one, or the prompt did
    (`thinking_open`, as chat templates of reasoning models do) -- has no answer: text
    inside the thinking is not an answer even if it looks like one."""
    if think_end and think_end in text:
        tail = text.rsplit(think_end, 1)[1]
    elif thinking_open or (think_start and think_start in text):
        return None
    else:
        tail = text
    if regex is not None:
        matches = regex.findall(tail)
        return _normalise(matches[-1]) if matches else None
    lines = _ANSWER_LINE.findall(tail)
    if lines:
        return _normalise(lines[-1])
    boxed = _last_boxed(tail)
    if boxed is not None:
        return _normalise(boxed)
    for line in reversed(tail.splitlines()):
        if line.strip():
            return _normalise(line)
    return None


def answer_extractor(*, thinking_open: bool = False, think_end: str = THINK_END,
                     think_start: str = THINK_START, pattern: str | None = None):
    """An ExtractAnswer for ttc_vllm.search over completions of one prompt
    (pattern defaults to TTC_VLLM_ANSWER_REGEX)."""
    regex = compile_answer_regex(pattern if pattern is not None else os.environ.get(ANSWER_REGEX_ENV))

    def extract(text: str) -> str | None:
        return extract_final_answer(text, think_end, think_start, regex, thinking_open)

    return extract
