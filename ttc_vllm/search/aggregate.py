"""PRM step-score aggregation and answer voting.

Voting functions take one answer per candidate (None: the candidate gave no answer) and
return the index of the chosen candidate, or None when no candidate answered. Ties are
broken deterministically: between answers, the one that appears first; between candidates
of the chosen answer, the highest weight, then the first.
"""
from __future__ import annotations

import math
from typing import Hashable, Sequence

AGGREGATIONS = ("min", "prod", "mean", "last")


def aggregate_step_scores(scores: Sequence[float], how: str) -> float:
    """One trace score from its per-step PRM scores.

    min: the weakest step (a chain is as good as its worst step); prod: probability that
    every step is right (penalises long chains); mean; last: the PRM's view of the whole
    prefix at its final step.
    """
    if not scores:
        raise ValueError("cannot aggregate an empty list of step scores")
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    if how == "mean":
        return sum(scores) / len(scores)
    if how == "last":
        return scores[-1]
    raise ValueError(f"unknown aggregation {how!r}; choose from {', '.join(AGGREGATIONS)}")


def _tally(answers: Sequence[Hashable | None], weights: Sequence[float]) -> dict[Hashable, float]:
    """Total weight per answer, in order of first appearance (dicts keep insertion order)."""
    totals: dict[Hashable, float] = {}
    for answer, weight in zip(answers, weights):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + weight
    return totals


def _best_candidate_of(answer: Hashable, answers: Sequence[Hashable | None],
                       weights: Sequence[float]) -> int:
    best = None
    for i, (a, w) in enumerate(zip(answers, weights)):
        if a == answer and (best is None or w > weights[best]):
            best = i
    return best


def _vote(answers: Sequence[Hashable | None], weights: Sequence[float]) -> int | None:
    if len(answers) != len(weights):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    totals = _tally(answers, weights)
    if not totals:
        return None
    # max() keeps the first of equal totals, i.e. the answer that appeared first.
    winner = max(totals, key=totals.__getitem__)
    return _best_candidate_of(winner, answers, weights)


def majority_vote(answers: Sequence[Hashable | None]) -> int | None:
    """Self-consistency: the most frequent answer; its first candidate represents it."""
    return _vote(answers, [1.0] * len(answers))


def weighted_vote(answers: Sequence[Hashable | None], weights: Sequence[float]) -> int | None:
    """PRM-weighted vote: the answer with the largest total weight; its highest-weight
    candidate represents it."""
    return _vote(answers, weights)


def best_of_n(answers: Sequence[Hashable | None], weights: Sequence[float]) -> int | None:
    """The highest-weight candidate among those that gave an answer."""
    if len(answers) != len(weights):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    best = None
    for i, (a, w) in enumerate(zip(answers, weights)):
        if a is not None and (best is None or w > weights[best]):
            best = i
    return best


DECISION_RULES = ("majority", "weighted_vote", "best_of_n")


def decide(rule: str, answers: Sequence[Hashable | None], weights: Sequence[float]) -> int | None:
    """The candidate `rule` picks (majority ignores the weights); None when nobody answered."""
    if rule == "majority":
        return majority_vote(answers)
    if rule == "weighted_vote":
        return weighted_vote(answers, weights)
    if rule == "best_of_n":
        return best_of_n(answers, weights)
    raise ValueError(f"unknown decision rule {rule!r}")
