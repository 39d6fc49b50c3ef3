"""Sampling n full traces, optionally with in-flight truncation of the weak ones.

Without `options.truncate` this is one `complete` call. With it (ST-BoN / DeepConf-online
style) the n traces are grown step by step for `after_steps` steps, the unfinished ones are
ranked -- by aggregated PRM score or by their lowest step confidence -- and only the best
`keep_ratio` share is completed; the rest are dropped, saving their remaining tokens.

The sampling strategies (majority, weighted_vote, best_of_n) draw their traces from here
and differ only in how they decide; truncation is an option of theirs, not a strategy.
"""
from __future__ import annotations

import math

from ttc_vllm.search.context import SearchContext
from ttc_vllm.search.options import TruncateOptions
from ttc_vllm.search.protocols import Candidate


async def sample_traces(ctx: SearchContext) -> list[Candidate]:
    """The traces to decide among, in sampling order (dropped traces excluded)."""
    options = ctx.options
    if options.truncate is None:
        [traces] = await ctx.complete([ctx.root], options.n, options.max_steps)
        return traces
    rule = options.truncate

    [live] = await ctx.expand([ctx.root], options.n)
    for _ in range(1, rule.after_steps):
        growing = [c for c in live if not c.finished]
        if not growing:
            break
        children = iter(await ctx.expand(growing, 1))
        live = [c if c.finished else next(children)[0] for c in live]

    unfinished = [i for i, c in enumerate(live) if not c.finished]
    kept = await _best_indices(ctx, [live[i] for i in unfinished], rule)
    kept = [unfinished[k] for k in kept]
    completed = await ctx.complete([live[i] for i in kept], 1, options.max_steps - rule.after_steps)
    for i, [done] in zip(kept, completed):
        live[i] = done
    dropped = set(unfinished) - set(kept)
    return [c for i, c in enumerate(live) if i not in dropped]


async def _best_indices(ctx: SearchContext, candidates: list[Candidate],
                        rule: TruncateOptions) -> list[int]:
    """Indices of the best ceil(keep_ratio * len) candidates, ascending."""
    if not candidates:
        return []
    if rule.by == "prm":
        strength = [c.score for c in await ctx.score(candidates)]
    else:
        strength = [trace_confidence(c) for c in candidates]
    keep = math.ceil(rule.keep_ratio * len(candidates))
    # Stable sort: among equals the earlier sample survives.
    ranked = sorted(range(len(candidates)), key=lambda i: -strength[i])
    return sorted(ranked[:keep])


def trace_confidence(candidate: Candidate) -> float:
    """The lowest step confidence of a trace (DeepConf's lowest-group confidence, with steps
    as the groups): one confused step marks the trace as weak."""
    values = [s.mean_confidence for s in candidate.trace.steps]
    if not values or any(v is None for v in values):
        raise RuntimeError("truncation by confidence needs Step.mean_confidence from the generator")
    return min(values)
