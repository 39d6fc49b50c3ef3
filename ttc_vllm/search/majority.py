"""Self-consistency: sample n full traces, answer with the most frequent answer.

Needs no PRM (unless truncation ranks by PRM). Ties go to the answer sampled first. With
`adaptive`, the traces come in waves until their answers agree (ttc_vllm/search/adaptive.py).
"""
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
        return ctx.result(await sample_in_waves(ctx, weighted=False), "majority")
    return ctx.result(await sample_traces(ctx), "majority")
