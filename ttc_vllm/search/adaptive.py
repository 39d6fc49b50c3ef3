"""Adaptive sampling for the voting strategies: traces in waves, stop at consensus.

After each wave the answered traces vote (each with weight 1 for majority, its aggregated
PRM score for weighted_vote); once at least `min_votes` traces have answered and the leading
answer holds at least `consensus` of the total weight, no further wave is sampled. This is
Adaptive-Consistency's / DeepConf-online's early exit, server-side: the tokens of the waves
not sampled are the saving, and agreement on easy problems is what triggers it.
"""
from __future__ import annotations

from ttc_vllm.search.aggregate import leading_share
from ttc_vllm.search.context import SearchContext
from ttc_vllm.search.protocols import Candidate


async def sample_in_waves(ctx: SearchContext, weighted: bool) -> list[Candidate]:
    """The traces sampled before consensus (or all n), in sampling order; scored by the PRM
    when `weighted` (each wave as it arrives, since the exit needs the weights)."""
    options = ctx.options
    rule = options.adaptive
    if rule is None:
        raise ValueError("sample_in_waves needs options.adaptive")
    traces: list[Candidate] = []
    for size in rule.schedule(options.n):
        [wave] = await ctx.complete([ctx.root], size, options.max_steps)
        traces += await ctx.score(wave) if weighted else wave
        answers = [ctx.answer_of(c) for c in traces]
        weights = [(c.score or 0.0) if weighted else 1.0 for c in traces]
        if leading_share(answers, weights, rule.min_votes) >= rule.consensus:
            break
    return traces
