"""Test-time search over a step generator (the policy) and a step scorer (the PRM).

Pure: imports no vLLM and no Ray. `run_search` dispatches on `SearchOptions.strategy`.
"""
from __future__ import annotations

from typing import Awaitable, Callable, Sequence

from ttc_vllm.search import beam, best_of_n, dvts, majority, mcts, weighted_vote
from ttc_vllm.search.controls import ControlledGenerator
from ttc_vllm.search.options import SearchOptions
from ttc_vllm.search.protocols import (
    Accounting, Candidate, Completion, ExtractAnswer, SearchResult, Step, StepGenerator,
    StepParams, StepScorer, Trace,
)

Strategy = Callable[..., Awaitable[SearchResult]]

STRATEGIES: dict[str, Strategy] = {
    "majority": majority.run,
    "weighted_vote": weighted_vote.run,
    "best_of_n": best_of_n.run,
    "beam": beam.run,
    "dvts": dvts.run,
    "mcts": mcts.run,
}


async def run_search(problem_prompt_ids: Sequence[int], generator: StepGenerator,
                     scorer: StepScorer | None, options: SearchOptions,
                     extract_answer: ExtractAnswer, controls: str | None = None) -> SearchResult:
    """Run the strategy named by options.strategy on one problem. `controls`: in-engine
    thinking controls for every engine request (`TTCOptions.sample_controls()`)."""
    if controls is not None:
        generator = ControlledGenerator(generator, controls)
    return await STRATEGIES[options.strategy](
        problem_prompt_ids, generator, scorer, options, extract_answer)


__all__ = [
    "Accounting", "Candidate", "Completion", "ExtractAnswer", "SearchOptions", "SearchResult",
    "Step", "StepGenerator", "StepParams", "StepScorer", "Trace", "STRATEGIES", "run_search",
]
