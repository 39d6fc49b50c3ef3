"""A search request's in-engine thinking controls, on every engine request it makes.

A search samples its traces (or steps) as many engine requests; a thinking budget or a
halting rule sent with it applies to each of them, enforced by the same logits processor
as a single request: `ControlledGenerator` stamps the controls into every call's
`StepParams.controls`, which both step generators turn into `extra_args["ttc"]`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from ttc_vllm.search.protocols import Completion, Step, StepGenerator, StepParams


class ControlledGenerator:
    """A StepGenerator whose calls all carry `controls` (`TTCOptions.sample_controls()`).
    Other attributes (`encode`, stats, ...) are the wrapped generator's."""

    def __init__(self, inner: StepGenerator, controls: str):
        self.inner = inner
        self.controls = controls

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def generate_steps(self, prefixes: Sequence[Sequence[int]], n: int,
                             params: StepParams) -> list[list[Step]]:
        return await self.inner.generate_steps(prefixes, n, replace(params, controls=self.controls))

    async def complete(self, prefixes: Sequence[Sequence[int]], n: int,
                       params: StepParams) -> list[list[Completion]]:
        return await self.inner.complete(prefixes, n, replace(params, controls=self.controls))
