"""Adaptive sampling for the voting strategies: traces in waves, stop at consensus.

After each wave the answered traces vote (each with weight 1, or for weighted_vote by
default its aggregated PRM score); once at least `min_votes` traces have answered and the
leading answer holds at least `consensus` of the total weight, no further wave is sampled.
weighted_vote with `exit_votes="counted"` stops on counted agreement and still decides by
PRM weight: its traces are scored once, after the last wave, not wave by wave. This is
Adaptive-Consistency's / DeepConf-online's early exit, server-side: the tokens of the waves
not sampled are the saving, and agreement on easy problems is what triggers it.
"""
from __future__ import annotations

from ttc_vllm.search.aggregate import leading_share
from ttc_vllm.search.context import SearchContext
from ttc_vllm.search.protocols import Candidate


async def sample_in_waves(ctx: SearchContext, weighted: bool) -> list[Candidate]:
    """The traces sampled before consensus (or all n), in sampling order; scored by the PRM
    when `weighted` (each wave as it arrives when the exit needs the weights, else once at
    the end)."""
    options = ctx.options
    rule = options.adaptive
    if rule is None:
        raise ValueError("sample_in_waves needs options.adaptive")
    weighted_exit = rule.weighted_exit(options.strategy)
    traces: list[Candidate] = []
    for size in rule.schedule(options.n):
        [wave] = await ctx.complete([ctx.root], size, options.max_steps)
        traces += await ctx.score(wave) if weighted_exit else wave
        answers = [ctx.answer_of(c) for c in traces]
        weights = [(c.score or 0.0) if weighted_exit else 1.0 for c in traces]
        if leading_share(answers, weights, rule.min_votes) >= rule.consensus:
            break
    if weighted and not weighted_exit:
        traces = await ctx.score(traces)   # one PRM call for every trace that was sampled
    return traces
