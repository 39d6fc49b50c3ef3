"""Per-request KV-cache accounting: blocks held over time, by request and by group.

Pure bookkeeping (no vLLM): the engine's scheduler (ttc_vllm_plugins/kv_accounting.py)
reports how many blocks each request holds whenever that number may have changed, and
closes a request when vLLM frees it. For every request the ledger keeps its peak blocks,
its block-seconds (blocks held integrated over time: a block held for 2 s counts 2), the
blocks it found in the prefix cache at admission and the ones newly allocated for it.

Requests may belong to a *group* (all engine requests of one search, or the n samples of
one request): the group's blocks are the distinct blocks its live members hold, so a
prefix block shared by eight samples counts once, and its peak and block-seconds are taken
over that union. A group outlives its members (a search opens its next wave after the last
one finished) and is forgotten, oldest first, past `max_groups` idle groups.

Block counts change only when a block is allocated or freed, so the integral is exact when
the scheduler reports every change: time is integrated lazily at each change and at close.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

# `SamplingParams.extra_args` keys the accounting reads: the KV group of an engine request,
# and the mark of the engine requests a search makes (so its records count as "search").
GROUP_EXTRA_ARG = "ttc_group"
SEARCH_EXTRA_ARG = "ttc_search_step"


@dataclass
class _Held:
    """Blocks held over time by one request or one group."""

    since: float
    blocks: int = 0
    peak: int = 0
    block_seconds: float = 0.0

    def set(self, blocks: int, now: float) -> None:
        self.block_seconds += self.blocks * max(now - self.since, 0.0)
        self.since = now
        self.blocks = blocks
        self.peak = max(self.peak, blocks)


@dataclass
class _Request:
    held: _Held
    group: str | None
    cached: int = 0         # blocks served from the prefix cache at admission
    grown: int = 0          # blocks added to it over its life (cached ones included)
    ids: list[int] = field(default_factory=list)   # its blocks in its group's union


@dataclass
class _Group:
    held: _Held
    members: int = 0
    counts: Counter = field(default_factory=Counter)   # block id -> live members holding it


class KVLedger:
    def __init__(self, block_size: int, max_groups: int = 4096):
        self.block_size = block_size
        self.max_groups = max_groups
        self._requests: dict[str, _Request] = {}
        self._groups: OrderedDict[str, _Group] = OrderedDict()
        self.grouped_blocks = 0   # distinct blocks held by all groups' live members now

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def open_requests(self) -> int:
        return len(self._requests)

    def open(self, request_id: str, now: float, group: str | None = None) -> None:
        self._requests[request_id] = _Request(_Held(now), group)
        if group is not None:
            g = self._groups.get(group)
            if g is None:
                g = self._groups[group] = _Group(_Held(now))
                self._evict_idle()
            self._groups.move_to_end(group)
            g.members += 1

    def admitted(self, request_id: str, cached_blocks: int) -> None:
        """The request was scheduled for the first time with `cached_blocks` full blocks of
        its prompt found in the prefix cache."""
        r = self._requests.get(request_id)
        if r is not None:
            r.cached = max(int(cached_blocks), 0)

    def holds(self, request_id: str) -> int:
        r = self._requests.get(request_id)
        return r.held.blocks if r is not None else 0

    def needs_ids(self, request_id: str) -> bool:
        r = self._requests.get(request_id)
        return r is not None and r.group is not None

    def update(self, request_id: str, blocks: int, now: float,
               block_ids: Sequence[int] | None = None) -> None:
        """The request holds `blocks` blocks now (`block_ids`: their ids, required for a
        grouped request whose count changed)."""
        r = self._requests.get(request_id)
        if r is None or blocks == r.held.blocks:
            return
        r.grown += max(blocks - r.held.blocks, 0)
        r.held.set(blocks, now)
        if r.group is not None:
            self._regroup(r, list(block_ids) if block_ids is not None else [], now)

    def close(self, request_id: str, now: float) -> dict[str, Any] | None:
        """Forget a freed request; its record (None if it was never opened)."""
        r = self._requests.pop(request_id, None)
        if r is None:
            return None
        r.held.set(0, now)
        record: dict[str, Any] = {
            "peak_blocks": r.held.peak, "block_seconds": round(r.held.block_seconds, 6),
            "cached_blocks": min(r.cached, r.held.peak), "new_blocks": max(r.grown - r.cached, 0),
            "block_size": self.block_size}
        if r.group is not None:
            self._regroup(r, [], now)
            g = self._groups.get(r.group)
            if g is not None:
                g.members -= 1
                record["group"] = {"peak_blocks": g.held.peak,
                                   "block_seconds": round(g.held.block_seconds, 6),
                                   "live_members": g.members}
        return record

    def _regroup(self, r: _Request, ids: list[int], now: float) -> None:
        g = self._groups.get(r.group)
        if g is None:
            return
        before = len(g.counts)
        g.counts.subtract(r.ids)
        for block_id in r.ids:
            if g.counts[block_id] <= 0:
                del g.counts[block_id]
        g.counts.update(ids)
        r.ids = ids
        self.grouped_blocks += len(g.counts) - before
        g.held.set(len(g.counts), now)

    def _evict_idle(self) -> None:
        if len(self._groups) <= self.max_groups:
            return
        for name in list(self._groups):
            if len(self._groups) <= self.max_groups:
                break
            if self._groups[name].members <= 0:
                del self._groups[name]
