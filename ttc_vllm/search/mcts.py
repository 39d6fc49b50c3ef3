"""Monte-Carlo tree search over steps, with PRM scores as leaf values.

Each rollout descends from the prompt by PUCT -- normalised mean value + c_puct * prior *
sqrt(N_parent) / (1 + N_child), uniform prior over siblings -- to a leaf. An open leaf is
expanded into beam_width one-step children, which are scored by the PRM; a child's value is
the PRM score of its last step (the PRM's estimate that the trace can still end right from
there: a state value), and the children's values are backed up along the path (a node's
mean value is the mean over every leaf evaluated beneath it). A terminal leaf (finished, or
at max_steps) is not expanded; its value is backed up again instead, as in classic MCTS.

The search stops after `mcts.rollouts` rollouts, once n finished traces were found, or when
no open leaf is left. The answer is the PRM-weighted vote (aggregated scores) of the
finished traces; if none finished, the open leaf of the highest value is completed in one
generator call. One rollout is one generator call: MCTS trades latency for tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from ttc_vllm.search.context import SearchContext
from ttc_vllm.search.options import SearchOptions
from ttc_vllm.search.protocols import (
    Candidate, ExtractAnswer, SearchResult, StepGenerator, StepScorer,
)


@dataclass(eq=False)
class Node:
    candidate: Candidate
    depth: int
    parent: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0

    @property
    def mean_value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0


def state_value(candidate: Candidate) -> float:
    return candidate.step_scores[-1]


def puct(child: Node, parent: Node, c_puct: float, lo: float, hi: float) -> float:
    """AlphaZero's PUCT with a uniform prior over the sampled siblings (sampling already
    follows the policy), on values min-max normalised over the tree as in MuZero: PRM
    scores of early steps can be small and close together, and c_puct should not depend
    on the PRM's scale."""
    value = (child.mean_value - lo) / (hi - lo) if hi > lo else child.mean_value
    prior = 1.0 / len(parent.children)
    return value + c_puct * prior * math.sqrt(parent.visits) / (1 + child.visits)


def select_leaf(root: Node, c_puct: float, lo: float, hi: float) -> Node:
    node = root
    while node.children:
        parent = node
        # max() keeps the first of equal values: deterministic.
        node = max(parent.children, key=lambda ch: puct(ch, parent, c_puct, lo, hi))
    return node


def backpropagate(node: Node | None, values: Sequence[float]) -> None:
    while node is not None:
        node.visits += len(values)
        node.value_sum += sum(values)
        node = node.parent


def best_open_leaf(root: Node) -> Node:
    """The unexpanded, unfinished node of the highest value, the deeper on ties, then the
    first in tree order: where to finish when no rollout reached an answer."""
    leaves, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.children:
            stack.extend(reversed(node.children))
        elif node is not root and not node.candidate.finished:
            leaves.append(node)
    return max(leaves, key=lambda n: (state_value(n.candidate), n.depth), default=root)


async def run(problem_prompt_ids: Sequence[int], generator: StepGenerator,
              scorer: StepScorer | None, options: SearchOptions,
              extract_answer: ExtractAnswer) -> SearchResult:
    ctx = SearchContext(problem_prompt_ids, generator, scorer, options, extract_answer)

    def terminal(node: Node) -> bool:
        return node.candidate.finished or node.depth >= options.max_steps

    root = Node(ctx.root, depth=0)
    finished: list[Candidate] = []
    open_leaves = 1
    lo, hi = math.inf, -math.inf  # range of the values seen, for normalisation
    for _ in range(options.mcts.rollouts):
        leaf = select_leaf(root, options.mcts.c_puct, lo, hi)
        if terminal(leaf):
            backpropagate(leaf, [state_value(leaf.candidate)])
            continue
        [children] = await ctx.expand([leaf.candidate], options.beam_width)
        children = await ctx.score(children)
        values = [state_value(c) for c in children]
        leaf.children = [Node(c, leaf.depth + 1, leaf, visits=1, value_sum=v)
                         for c, v in zip(children, values)]
        backpropagate(leaf, values)
        lo, hi = min(lo, *values), max(hi, *values)
        finished += [c for c in children if c.finished]
        open_leaves += sum(not terminal(ch) for ch in leaf.children) - 1
        if len(finished) >= options.n or open_leaves == 0:
            break

    if not finished:
        leaf = best_open_leaf(root)
        if leaf.depth < options.max_steps:
            [[done]] = await ctx.complete([leaf.candidate], 1, options.max_steps - leaf.depth)
            finished = await ctx.score([done])
        else:
            finished = [leaf.candidate]
    return ctx.result(finished, "weighted_vote")
