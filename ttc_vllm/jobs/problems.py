"""What a job evaluates: problems with their expected answers, from the testbed's tiers or a
JSONL file of {"prompt": ..., "answer": ...} rows."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ttc_vllm.jobs.errors import JobError
from ttc_vllm.testbed import task


@dataclass(frozen=True)
class EvalProblem:
    tier: str
    index: int
    prompt: str  # exactly the text the model continues (or the user message with --chat)
    answer: str  # expected answer, normalised like extracted answers

    @property
    def sha(self) -> str:
        return hashlib.sha256(f"{self.prompt}\0{self.answer}".encode()).hexdigest()[:16]



def normalise_answer(answer: Any) -> str:
    return " ".join(str(answer).split())


def testbed_problems(tiers: Sequence[str], count: int, seed: int) -> list[EvalProblem]:
    """`count` problems of each tier (the testbed generator: same seed, same problems)."""
    return [EvalProblem(name, i, task.prompt(p), str(p.answer))
            for name in tiers for i, p in enumerate(task.generate(name, count, seed))]


def jsonl_problems(path: Path, name: str, limit: int | None = None) -> list[EvalProblem]:
    """Rows {"prompt": str, "answer": any} of a JSONL file (blank lines skipped), the first
    `limit` of them; the tier of every problem is `name`, the index its row number."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"cannot read dataset {path}: {e}") from None
    problems: list[EvalProblem] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise JobError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise JobError(f"{path}:{lineno}: expected an object with a non-empty string 'prompt'")
        if row.get("answer") is None or not normalise_answer(row["answer"]):
            raise JobError(f"{path}:{lineno}: missing 'answer'")
        problems.append(EvalProblem(name, len(problems), row["prompt"], normalise_answer(row["answer"])))
        if limit is not None and len(problems) == limit:
            break
    if not problems:
        raise JobError(f"dataset {path} holds no rows")
    return problems
