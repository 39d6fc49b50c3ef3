"""Diverse verifier tree search (DVTS): n / beam_width independent subtrees, each a greedy
search by PRM score.

Each round every unfinished subtree expands its head into beam_width one-step children and
keeps the best of them (by aggregated PRM score) as its new head; all subtrees are expanded
and scored together, one generator call and one PRM call per round. Independent subtrees
keep the final answers diverse where one beam would collapse onto a single path. The
answer is the PRM-weighted vote of the subtree heads.
"""
from __future__ import annotations

from typing import Sequence

from ttc_vllm.search.context import SearchContext
from ttc_vllm.search.options import SearchOptions
from ttc_vllm.search.protocols import (
    Candidate, ExtractAnswer, SearchResult, StepGenerator, StepScorer,
)


async def run(problem_prompt_ids: Sequence[int], generator: StepGenerator,
              scorer: StepScorer | None, options: SearchOptions,
              extract_answer: ExtractAnswer) -> SearchResult:
    ctx = SearchContext(problem_prompt_ids, generator, scorer, options, extract_answer)
    width = options.beam_width
    num_subtrees = options.n // width
    # The first round samples all n steps from the prompt; subtree i owns samples i*w..i*w+w-1.
    [first] = await ctx.expand([ctx.root], options.n)
    groups = [first[i * width:(i + 1) * width] for i in range(num_subtrees)]
    heads: list[Candidate | None] = [None] * num_subtrees
    growing = list(range(num_subtrees))
    for depth in range(1, options.max_steps + 1):
        scored = await ctx.score([c for g in groups for c in g])
        for k, subtree in enumerate(growing):
            # max() keeps the first of equal scores.
            heads[subtree] = max(scored[k * width:(k + 1) * width], key=lambda c: c.score)
        growing = [i for i in growing if not heads[i].finished]
        if not growing or depth == options.max_steps:
            break
        groups = await ctx.expand([heads[i] for i in growing], width)
    return ctx.result(heads, "weighted_vote")
