"""The two protocols search runs over -- a step generator (the policy) and a step scorer
(the PRM) -- and the data they exchange with the search strategies.

Everything is token ids first: a candidate is the problem prompt's token ids followed by
its steps' token ids, exactly as the engine produced them, so every expansion sends the
engine a prefix it has already seen (prefix-cache hits) and the PRM sees the same tokens
the policy wrote.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Hashable, Protocol, Sequence, runtime_checkable

# Maps a completion's text (everything after the prompt) to a hashable answer, or None when
# the text holds no answer. Testbed: ttc_vllm.testbed.task.extract_answer.
ExtractAnswer = Callable[[str], Hashable | None]


@dataclass(frozen=True)
class Step:
    """One generated step: the tokens from the end of the prefix up to and including the step
    delimiter, or up to the end of the trace (answer + EOS).

    Engine usage rides on the steps so that summing over every step a call returned gives
    the engine's totals: siblings sampled from one engine request (n > 1) report the
    request's prompt on ONE of them (the others report 0).
    """

    token_ids: tuple[int, ...]
    text: str
    finished: bool  # the trace ended with this step (EOS / answer); nothing may follow it
    prompt_tokens: int = 0  # prompt tokens of the engine request this step came from
    cached_prompt_tokens: int = 0  # of those, served by the prefix cache (num_cached_tokens)
    generated_tokens: int = -1  # tokens decoded for this step; -1 -> len(token_ids)
    mean_confidence: float | None = None  # mean token confidence (-mean top-k logprob); None if not requested

    def __post_init__(self):
        object.__setattr__(self, "token_ids", tuple(self.token_ids))
        if self.generated_tokens < 0:
            object.__setattr__(self, "generated_tokens", len(self.token_ids))


# A full continuation of one prefix (what `StepGenerator.complete` returns per sample), split
# into steps at the step delimiter exactly as `generate_steps` would have cut it.
Completion = tuple[Step, ...]


@dataclass(frozen=True)
class Trace:
    """A (partial) solution: the problem prompt plus the steps taken so far."""

    prompt_ids: tuple[int, ...]
    steps: tuple[Step, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))
        object.__setattr__(self, "steps", tuple(self.steps))

    @cached_property
    def token_ids(self) -> tuple[int, ...]:
        """Prompt + every step: the prefix the next expansion sends to the engine."""
        ids = list(self.prompt_ids)
        for step in self.steps:
            ids.extend(step.token_ids)
        return tuple(ids)

    @property
    def text(self) -> str:
        """The completion text (the prompt excluded)."""
        return "".join(step.text for step in self.steps)

    @property
    def finished(self) -> bool:
        return bool(self.steps) and self.steps[-1].finished

    def extend(self, steps: Sequence[Step]) -> "Trace":
        return Trace(self.prompt_ids, self.steps + tuple(steps))


@dataclass(frozen=True)
class StepParams:
    """Sampling settings of one generator call."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256  # per step in generate_steps, per whole continuation in complete
    # Where a step ends. None: the default the generator was built with (the testbed passes
    # its <step> token; "\n\n" is the usual choice for real models). The delimiter is kept
    # in the step's tokens.
    step_delimiter: str | None = None
    confidence: bool = False  # fill Step.mean_confidence (costs top-k logprobs in the engine)
    # The request's in-engine thinking controls for every engine request of the call: the
    # JSON that goes into SamplingParams.extra_args["ttc"] (`TTCOptions.sample_controls`).
    controls: str | None = None


@runtime_checkable
class StepGenerator(Protocol):
    """The policy. Async because the server runs search on vLLM's async engine client;
    offline code wraps a synchronous LLM."""

    async def generate_steps(
        self, prefixes: Sequence[Sequence[int]], n: int, params: StepParams
    ) -> list[list[Step]]:
        """For each prefix (prompt + steps so far, token ids), `n` sampled continuations of
        ONE step each. result[i][j] is sample j of prefixes[i]; len(result) == len(prefixes)
        and len(result[i]) == n."""
        ...

    async def complete(
        self, prefixes: Sequence[Sequence[int]], n: int, params: StepParams
    ) -> list[list[Completion]]:
        """For each prefix, `n` sampled continuations to the end of the trace (or
        params.max_tokens), each split into steps. Same shape rules as generate_steps."""
        ...


@runtime_checkable
class StepScorer(Protocol):
    """The process reward model."""

    async def score(self, traces: Sequence[Trace]) -> list[list[float]]:
        """Per-step scores of each trace: result[i][k] in [0, 1] is the PRM's estimate that
        step k of traces[i] is correct, given the prompt and steps 0..k-1.

        Exactly one score per step: len(result[i]) == len(traces[i].steps). A scorer whose PRM
        marks steps with a tag (the testbed's <step>, Qwen-PRM's <extra_0>) appends the tag to
        a step that lacks it (typically the final answer step). Traces may come from different
        problems (the PRM pool batches calls from concurrent searches)."""
        ...


@dataclass(frozen=True)
class Candidate:
    """A trace as search sees it: its PRM step scores, their aggregate, and its answer."""

    trace: Trace
    step_scores: tuple[float, ...] | None = None  # None until scored
    score: float | None = None  # step_scores aggregated (SearchOptions.aggregation)
    answer: str | None = None  # filled when the search decides

    @property
    def finished(self) -> bool:
        return self.trace.finished


@dataclass
class Accounting:
    """What a search cost, summed from what the generator and scorer reported."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generator_calls: int = 0  # generate_steps / complete calls (sequential rounds)
    nodes_expanded: int = 0  # prefixes sent to the generator (one engine request each)
    prm_calls: int = 0  # StepScorer.score calls
    prm_traces: int = 0  # traces scored
    prm_tokens: int = 0  # policy tokens of the scored traces (prompt + steps)
    halted: int = 0  # candidates that never finished and were never continued (pruned, cut)
    wall_time_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SearchResult:
    answer: str | None  # str(extract_answer(text)) of the chosen trace; None if no trace answered
    text: str  # the chosen trace's completion text
    chosen: Candidate | None  # None only when there were no candidates at all
    candidates: list[Candidate] = field(default_factory=list)  # what the decision looked at
    accounting: Accounting = field(default_factory=Accounting)
