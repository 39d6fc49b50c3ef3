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


def leading_share(answers: Sequence[Hashable | None], weights: Sequence[float], min_votes: int = 1) -> float:
    """The leading answer's share of the total weight (negative weights count as 0); 0.0
    when fewer than `min_votes` candidates answered or no answer has positive weight. What
    adaptive sampling's exit compares with its consensus."""
    if len(answers) != len(weights):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    if sum(a is not None for a in answers) < min_votes:
        return 0.0
    totals = _tally(answers, [max(w, 0.0) for w in weights])
    total = sum(totals.values())
    return max(totals.values()) / total if total > 0.0 else 0.0


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
