"""Per-trace measurements on testbed completions (pure: token ids in, numbers out)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

_STEP_RESULT = re.compile(r"=(-?\d+)\s*$")


@dataclass(frozen=True)
class MarkerIds:
    think_end: int
    step_tag: int
    eos: int

    @classmethod
    def from_tokenizer(cls, tok) -> "MarkerIds":
        from ttc_vllm.testbed.task import STEP_TAG, THINK_END

        return cls(tok.convert_tokens_to_ids(THINK_END), tok.convert_tokens_to_ids(STEP_TAG), tok.eos_token_id)


def thinking_tokens(token_ids: Sequence[int], ids: MarkerIds) -> int:
    """Tokens generated inside the thinking block (the prompt opened it)."""
    for i, t in enumerate(token_ids):
        if t == ids.think_end:
            return i
    return len(token_ids)


def overthinking_tokens(token_ids: Sequence[int], ids: MarkerIds, decode, answer: int | None) -> int:
    """Thinking tokens spent after the step that first states `answer` (0 if it never does)."""
    n_think = thinking_tokens(token_ids, ids)
    if answer is None:
        return 0
    start = 0
    for i in range(n_think):
        if token_ids[i] == ids.step_tag:
            m = _STEP_RESULT.search(decode(token_ids[start:i]))
            if m and int(m.group(1)) == answer:
                return n_think - (i + 1)
            start = i + 1
    return 0
