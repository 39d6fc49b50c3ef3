"""A job's plan: the (strategy, n) grid over the problems, as items (strategy, n, tier,
index), with the search settings and the identities that every record is made under."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError

from ttc_vllm.jobs.errors import JobError
from ttc_vllm.jobs.problems import EvalProblem
from ttc_vllm.options import EXTRA_ARGS_KEY, TTCOptions
from ttc_vllm.search import STRATEGIES, SearchOptions
from ttc_vllm.testbed import task

TESTBED_POLICY = "testbed-policy"  # identity of the shipped policy in records (paths differ per machine)
TESTBED_PRM = "testbed-prm"

Key = tuple[str, int, str, int]  # (strategy, n, tier, index)


@dataclass(frozen=True)
class Item:
    strategy: str
    n: int
    problem: EvalProblem

    @property
    def key(self) -> Key:
        return (self.strategy, self.n, self.problem.tier, self.problem.index)


@dataclass
class Plan:
    """What to run: the problems, the (strategy, n) grid, the search settings shared by all
    items, and the identities of policy and PRM written into every record."""

    problems: list[EvalProblem]
    strategies: list[str]
    ns: list[int]
    search: dict[str, Any]  # SearchOptions fields other than strategy and n
    policy: str = TESTBED_POLICY
    prm: str | None = TESTBED_PRM  # None: no PRM available
    testbed_answers: bool = True  # testbed answer line; else ttc_vllm.answer's generic rule
    chat: bool = False  # render prompts with the policy's chat template
    # In-engine thinking controls (TTCOptions fields: max_think, halting, ...) that every
    # engine request of every search carries; None: none.
    controls: dict[str, Any] | None = None

    def __post_init__(self):
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise JobError(f"unknown strategy {', '.join(unknown) or '(none)'}; choose from "
                           f"{', '.join(STRATEGIES)}")
        bad = [n for n in self.ns if not isinstance(n, int) or n < 1]
        if bad or not self.ns:
            raise JobError(f"n must be positive integers, got {self.ns}")
        if not self.problems:
            raise JobError("no problems to evaluate")
        self._options: dict[tuple[str, int], SearchOptions] = {}
        for strategy in self.strategies:
            for n in self.ns:
                try:
                    options = SearchOptions(strategy=strategy, n=n, **self.search)
                except ValidationError as e:
                    err = e.errors()[0]
                    where = ".".join(str(x) for x in err["loc"]) or "options"
                    raise JobError(f"{strategy} n={n}: {where}: {err['msg']}") from None
                if options.needs_scorer and self.prm is None:
                    raise JobError(f"strategy {strategy!r} needs a PRM and none is available "
                                   "(pass --prm-config, or ship the testbed PRM)")
                self._options[(strategy, n)] = options
                self._sample_controls = self._check_controls(options)

    def _check_controls(self, options: SearchOptions) -> str | None:
        if not self.controls:
            return None
        if not isinstance(self.controls, dict) or "search" in self.controls:
            raise JobError("--controls: expected an object of thinking controls (max_think, "
                           "halting, ...) without 'search' (the grid sets it)")
        try:
            ttc = TTCOptions.from_extra_args(
                {EXTRA_ARGS_KEY: {**self.controls, "search": options.model_dump(mode="json")}})
        except ValueError as e:
            raise JobError(f"--controls with {options.strategy}: {e}") from None
        return ttc.sample_controls()

    @property
    def sample_controls(self) -> str | None:
        """The controls' `extra_args["ttc"]` JSON, or None."""
        return self._sample_controls

    def options(self, strategy: str, n: int) -> SearchOptions:
        return self._options[(strategy, n)]

    @property
    def tiers(self) -> list[str]:
        return list(dict.fromkeys(p.tier for p in self.problems))

    def items(self) -> list[Item]:
        """Grouped by (strategy, n) so that items in flight together make the same kind of
        engine calls (replicas merge those)."""
        return [Item(s, n, p) for s in self.strategies for n in sorted(self.ns) for p in self.problems]

    def setup(self, item: Item) -> dict[str, Any]:
        """What a record of this item must have been made with to count as done."""
        options = self.options(item.strategy, item.n)
        return {"policy": self.policy, "prm": self.prm if options.needs_scorer else None,
                "chat": self.chat, "options": options.model_dump(mode="json"),
                "problem_sha": item.problem.sha,
                **({"controls": json.loads(self.sample_controls)} if self.sample_controls else {})}

    def extract_answer(self) -> Callable[[str], Any]:
        if self.testbed_answers:
            return task.extract_answer
        from ttc_vllm.answer import answer_extractor

        return answer_extractor()
