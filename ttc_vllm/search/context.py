"""Bookkeeping every strategy shares: expanding candidates through the generator, scoring
them through the PRM, counting what both report, and turning the final candidates into a
SearchResult. Strategies hold only their control flow.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

from ttc_vllm.search.aggregate import DECISION_RULES, aggregate_step_scores, decide
from ttc_vllm.search.options import SearchOptions
from ttc_vllm.search.protocols import (
    Accounting, Candidate, Completion, ExtractAnswer, SearchResult, StepGenerator,
    StepParams, StepScorer, Trace,
)



class SearchContext:
    def __init__(self, prompt_ids: Sequence[int], generator: StepGenerator,
                 scorer: StepScorer | None, options: SearchOptions, extract_answer: ExtractAnswer):
        if not prompt_ids:
            raise ValueError("problem_prompt_ids is empty")
        if options.needs_scorer and scorer is None:
            raise ValueError(f"strategy {options.strategy!r} with these options needs a PRM scorer")
        self.generator = generator
        self.scorer = scorer
        self.options = options
        self.extract_answer = extract_answer
        self.root = Candidate(Trace(tuple(prompt_ids)))
        self.accounting = Accounting()
        self._started = time.perf_counter()
        # For `halted`: unfinished candidates produced minus those later continued. Continued
        # traces are keyed by identity and kept alive so an id is never reused.
        self._created_unfinished = 0
        self._continued: dict[int, Trace] = {}

    # -- generation ---------------------------------------------------------------------
    def step_params(self, max_tokens: int | None = None) -> StepParams:
        o = self.options
        return StepParams(
            temperature=o.temperature, top_p=o.top_p,
            max_tokens=max_tokens or o.max_step_tokens, step_delimiter=o.step_delimiter,
            confidence=o.truncate is not None and o.truncate.by == "confidence",
        )

    async def expand(self, parents: Sequence[Candidate], n: int) -> list[list[Candidate]]:
        """n one-step children of each parent; result[i] are the children of parents[i]."""
        if not parents:
            return []
        self._mark_continued(parents)
        steps = await self.generator.generate_steps(
            [p.trace.token_ids for p in parents], n, self.step_params())
        self._check_shape("generate_steps", steps, len(parents), n)
        return [[self._child(p, (s,)) for s in samples] for p, samples in zip(parents, steps)]

    async def complete(self, parents: Sequence[Candidate], n: int,
                       max_steps_left: int) -> list[list[Candidate]]:
        """n continuations of each parent to the end of the trace, within max_steps_left
        steps' worth of tokens."""
        if not parents:
            return []
        self._mark_continued(parents)
        params = self.step_params(max_tokens=max(1, max_steps_left) * self.options.max_step_tokens)
        completions = await self.generator.complete([p.trace.token_ids for p in parents], n, params)
        self._check_shape("complete", completions, len(parents), n)
        return [[self._child(p, c) for c in samples] for p, samples in zip(parents, completions)]

    def _mark_continued(self, parents: Sequence[Candidate]) -> None:
        for parent in parents:
            if parent.finished:
                raise ValueError("cannot continue a finished trace")
            self._continued.setdefault(id(parent.trace), parent.trace)

    def _child(self, parent: Candidate, steps: Completion) -> Candidate:
        if not steps:
            raise RuntimeError("generator returned a continuation with no steps")
        child = Candidate(parent.trace.extend(steps))
        self._created_unfinished += not child.finished
        a = self.accounting
        for step in steps:
            a.generated_tokens += step.generated_tokens
            a.prompt_tokens += step.prompt_tokens
            a.cached_prompt_tokens += step.cached_prompt_tokens
        return child

    def _check_shape(self, call: str, result, num_prefixes: int, n: int) -> None:
        if len(result) != num_prefixes or any(len(r) != n for r in result):
            raise RuntimeError(
                f"generator.{call} returned {[len(r) for r in result]} samples for "
                f"{num_prefixes} prefixes x n={n}")
        self.accounting.generator_calls += 1
        self.accounting.nodes_expanded += num_prefixes

    # -- scoring ------------------------------------------------------------------------
    async def score(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates with PRM step scores and their aggregate, in the same order."""
        if not candidates:
            return []
        if self.scorer is None:
            raise ValueError(f"strategy {self.options.strategy!r} needs a PRM scorer; none was given")
        traces = [c.trace for c in candidates]
        scores = await self.scorer.score(traces)
        if len(scores) != len(traces):
            raise RuntimeError(f"scorer returned {len(scores)} score lists for {len(traces)} traces")
        a = self.accounting
        a.prm_calls += 1
        a.prm_traces += len(traces)
        scored = []
        for cand, step_scores in zip(candidates, scores):
            if len(step_scores) != len(cand.trace.steps):
                raise RuntimeError(f"scorer returned {len(step_scores)} scores for a "
                                   f"{len(cand.trace.steps)}-step trace")
            a.prm_tokens += len(cand.trace.token_ids)
            step_scores = tuple(float(s) for s in step_scores)
            scored.append(replace(cand, step_scores=step_scores,
                                  score=aggregate_step_scores(step_scores, self.options.aggregation)))
        return scored

    # -- decision -----------------------------------------------------------------------
    def result(self, candidates: Sequence[Candidate], rule: str) -> SearchResult:
        """Decide among the final candidates by `rule` (majority, weighted_vote, best_of_n;
        the latter two weigh by the aggregated PRM score) and close the accounting."""
        if rule not in DECISION_RULES:
            raise ValueError(f"unknown decision rule {rule!r}")
        candidates = [replace(c, answer=self.answer_of(c)) for c in candidates]
        answers = [c.answer for c in candidates]
        weights = [c.score if c.score is not None else 0.0 for c in candidates]
        index = decide(rule, answers, weights)
        if index is None and candidates:  # nobody answered: report the best-scored trace
            index = max(range(len(candidates)),
                        key=lambda i: candidates[i].score if candidates[i].score is not None else 0.0)
        chosen = candidates[index] if index is not None else None
        a = self.accounting
        continued = len(self._continued) - (id(self.root.trace) in self._continued)
        a.halted = self._created_unfinished - continued
        a.wall_time_s = time.perf_counter() - self._started
        return SearchResult(
            answer=chosen.answer if chosen else None,
            text=chosen.trace.text if chosen else "",
            chosen=chosen, candidates=candidates, accounting=a,
        )

    def answer_of(self, candidate: Candidate) -> str | None:
        """The answer a finished candidate gives (as a string), None if unfinished or none."""
        if not candidate.finished:
            return None
        value = self.extract_answer(candidate.trace.text)
        return None if value is None else str(value)
