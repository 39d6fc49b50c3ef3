"""PRM-weighted vote: sample n full traces, score them with the PRM, answer with the answer
whose traces have the largest total aggregated score."""
from __future__ import annotations

from typing import Sequence

from ttc_vllm.search.adaptive import sample_in_waves
from ttc_vllm.search.context import SearchContext
from ttc_vllm.search.options import SearchOptions
from ttc_vllm.search.protocols import ExtractAnswer, SearchResult, StepGenerator, StepScorer
from ttc_vllm.search.truncation import sample_traces


async def run(problem_prompt_ids: Sequence[int], generator: StepGenerator,
              scorer: StepScorer | None, options: SearchOptions,
              extract_answer: ExtractAnswer) -> SearchResult:
    ctx = SearchContext(problem_prompt_ids, generator, scorer, options, extract_answer)
    if options.adaptive is not None:
        return ctx.result(await sample_in_waves(ctx, weighted=True), "weighted_vote")
    traces = await ctx.score(await sample_traces(ctx))
    return ctx.result(traces, "weighted_vote")
