"""Per-request search options (composed by ttc_vllm.options.TTCOptions as field `search`).

Rules that only matter to some strategies are checked only for them: beam_width must divide
n for beam and dvts; truncation applies only to the sampling strategies (majority,
weighted_vote, best_of_n); adaptive sampling only to the voting ones (majority,
weighted_vote), whose decision has a consensus to wait for.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ttc_vllm.limits import MAX_COUNT, StrictFloat, StrictInt, env_positive_int

MAX_N_ENV = "TTC_VLLM_MAX_N"
DEFAULT_MAX_N = 64

Strategy = Literal["majority", "weighted_vote", "best_of_n", "beam", "dvts", "mcts"]
Aggregation = Literal["min", "prod", "mean", "last"]
SAMPLING_STRATEGIES = ("majority", "weighted_vote", "best_of_n")
BEAM_STRATEGIES = ("beam", "dvts")
VOTING_STRATEGIES = ("majority", "weighted_vote")


def max_n() -> int:
    """The server's ceiling on `n` (env TTC_VLLM_MAX_N, default 64), read at validation time."""
    return env_positive_int(MAX_N_ENV, DEFAULT_MAX_N)


class TruncateOptions(BaseModel):
    """In-flight truncation (ST-BoN / DeepConf-online style): after `after_steps` steps keep
    the best `keep_ratio` share of the unfinished traces and drop the rest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    after_steps: StrictInt = Field(2, ge=1, le=MAX_COUNT)
    keep_ratio: StrictFloat = Field(0.5, gt=0.0, lt=1.0)
    # "prm": rank by aggregated PRM step scores; "confidence": by the trace's lowest step
    # confidence (needs token logprobs from the engine, no PRM).
    by: Literal["prm", "confidence"] = "prm"


class AdaptiveOptions(BaseModel):
    """Adaptive sampling (Adaptive-Consistency / DeepConf-online's early exit): the n traces
    come in waves, and sampling stops after a wave once the leading answer holds at least
    `consensus` of the votes among >= `min_votes` answered traces. Easy problems stop after a
    wave or two; contested ones get all n.

    `exit_votes` says what the consensus counts: "weighted" (the traces' PRM scores; the
    default for weighted_vote, which then scores each wave as it arrives) or "counted" (one
    vote per answered trace; majority's only choice). weighted_vote with a counted exit
    still decides by PRM weight, and scores the sampled traces once, after the last wave."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # traces per wave, summing to n; None: waves of 4 (the last one smaller)
    waves: tuple[StrictInt, ...] | None = Field(None, min_length=1, max_length=64)
    consensus: StrictFloat = Field(0.75, gt=0.5, le=1.0)
    min_votes: StrictInt = Field(2, ge=1, le=MAX_COUNT)
    exit_votes: Literal["weighted", "counted"] | None = None   # None: weighted for weighted_vote

    @field_validator("waves")
    @classmethod
    def _positive_waves(cls, waves: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if waves is not None and any(w < 1 for w in waves):
            raise ValueError(f"every wave must hold at least 1 trace, got {list(waves)}")
        return waves

    def schedule(self, n: int) -> tuple[int, ...]:
        """The wave sizes for n traces."""
        if self.waves is not None:
            return self.waves
        return tuple(min(4, n - i) for i in range(0, n, 4))

    def weighted_exit(self, strategy: str) -> bool:
        """Whether the consensus is PRM-weighted for this strategy."""
        return strategy == "weighted_vote" and self.exit_votes != "counted"


class MCTSOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    c_puct: StrictFloat = Field(1.0, gt=0.0, le=100.0)  # UCT exploration weight
    rollouts: StrictInt = Field(32, ge=1, le=MAX_COUNT)  # select-expand-backpropagate iterations


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy
    n: StrictInt = Field(8, ge=1)  # traces sampled (majority/vote/BoN); candidates per step (beam/dvts); finished traces sought (mcts)
    beam_width: StrictInt = Field(4, ge=1, le=MAX_COUNT)  # children per expanded node (beam, dvts, mcts)
    max_steps: StrictInt = Field(32, ge=1, le=1024)
    max_step_tokens: StrictInt = Field(256, ge=1, le=65536)
    temperature: StrictFloat = Field(0.8, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    aggregation: Aggregation = "min"
    step_delimiter: str | None = Field(None, min_length=1)  # None: the generator's default
    mcts: MCTSOptions = MCTSOptions()
    truncate: TruncateOptions | None = None
    adaptive: AdaptiveOptions | None = None

    @field_validator("n")
    @classmethod
    def _n_within_ceiling(cls, n: int) -> int:
        ceiling = max_n()
        if n > ceiling:
            raise ValueError(f"n={n} exceeds this server's limit of {ceiling} (set by {MAX_N_ENV})")
        return n

    @model_validator(mode="after")
    def _strategy_specific(self) -> "SearchOptions":
        if self.strategy in BEAM_STRATEGIES:
            if self.n % self.beam_width:
                raise ValueError(
                    f"beam_width ({self.beam_width}) must divide n ({self.n}) "
                    f"for strategy {self.strategy!r}"
                )
        if self.truncate is not None:
            if self.strategy not in SAMPLING_STRATEGIES:
                raise ValueError(
                    f"truncate applies only to strategies {', '.join(SAMPLING_STRATEGIES)}; "
                    f"got strategy {self.strategy!r}"
                )
            if self.truncate.after_steps >= self.max_steps:
                raise ValueError(
                    f"truncate.after_steps ({self.truncate.after_steps}) must be below "
                    f"max_steps ({self.max_steps})"
                )
        if self.adaptive is not None:
            if self.strategy not in VOTING_STRATEGIES:
                raise ValueError(
                    f"adaptive applies only to strategies {', '.join(VOTING_STRATEGIES)}; "
                    f"got strategy {self.strategy!r}"
                )
            if self.truncate is not None:
                raise ValueError("adaptive and truncate cannot be combined (choose one way to save traces)")
            if self.adaptive.exit_votes == "weighted" and self.strategy != "weighted_vote":
                raise ValueError(f"adaptive.exit_votes 'weighted' needs strategy weighted_vote "
                                 f"(PRM weights); strategy {self.strategy!r} counts votes")
            waves = self.adaptive.waves
            if waves is not None and sum(waves) != self.n:
                raise ValueError(f"adaptive.waves {list(waves)} must sum to n ({self.n})")
        return self

    @property
    def work_per_prompt(self) -> int:
        """Upper bound on the engine requests one prompt's search makes, counted as
        candidates x steps: n whole traces for the sampling strategies (n x max_steps
        step requests with truncation), n x max_steps for beam / DVTS, beam_width children
        per rollout for MCTS. The server's per-request work ceiling is on this times the
        prompts."""
        if self.strategy in SAMPLING_STRATEGIES:
            return self.n * (self.max_steps if self.truncate is not None else 1)
        if self.strategy in BEAM_STRATEGIES:
            return self.n * self.max_steps
        return self.beam_width * self.mcts.rollouts

    @property
    def needs_scorer(self) -> bool:
        """Whether this search calls the PRM."""
        if self.strategy == "majority":
            return self.truncate is not None and self.truncate.by == "prm"
        return True
