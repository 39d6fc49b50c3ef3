"""Step-level beam search guided by the PRM.

The beam holds n / beam_width candidates. Each round every unfinished candidate in the beam
is expanded into beam_width one-step children (n children when none has finished), the
children are scored, and the best n / beam_width of children plus finished beam members
(by aggregated PRM score) form the next beam. Finished candidates keep their place without
being expanded, so a round never samples more than n steps, and the search stops once the
whole beam has finished (or at max_steps). The answer is the PRM-weighted vote of the beam.
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
    beam_size = options.n // options.beam_width
    [children] = await ctx.expand([ctx.root], options.n)
    beam: list[Candidate] = []
    for depth in range(1, options.max_steps + 1):
        finished = [c for c in beam if c.finished]
        beam = top_distinct(finished + await ctx.score(children), beam_size)
        growing = [c for c in beam if not c.finished]
        if not growing or depth == options.max_steps:
            break
        children = [c for group in await ctx.expand(growing, options.beam_width) for c in group]
    return ctx.result(beam, "weighted_vote")


def top_distinct(candidates: Sequence[Candidate], k: int) -> list[Candidate]:
    """The k best-scored candidates, skipping exact duplicates (same token ids) so that one
    path does not fill several beam slots. Ties keep the earlier candidate."""
    ranked = sorted(candidates, key=lambda c: -c.score)  # stable
    chosen, seen = [], set()
    for c in ranked:
        if c.trace.token_ids not in seen:
            seen.add(c.trace.token_ids)
            chosen.append(c)
            if len(chosen) == k:
                break
    return chosen
