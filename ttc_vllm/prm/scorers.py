"""Process reward models behind the search StepScorer protocol, served by vLLM.

Two kinds, one `PRMConfig`:
- `VLLMPoolingPRM` ("pooling"): a `*ForProcessRewardModel` (Qwen2.5-Math-PRM, the testbed
  PRM) in `LLM(model, runner="pooling")`. vLLM's STEP pooling returns one row of class
  logits per position whose *prompt* token is the step tag; the step's score is the softmax
  column `good_label` (sigmoid when the head has a single column).
- `TokenLabelPRM` ("token_label"): a causal LM trained to write a good/bad token after the
  step tag (math-shepherd "+"/"-", RLHFlow). vLLM converts it into a pooling model whose
  score head is the two LM-head rows [bad, good] (`convert="classify"`, method
  `no_post_processing`), with STEP pooling at the tag; the step's score is
  softmax([logit_bad, logit_good])[good] -- exactly P(good) / (P(good) + P(bad)).

Inputs (`PRMConfig.input_format`):
- "token_ids": the PRM shares the policy's tokenizer; its input is the trace's own token ids
  with the tag appended to every step that does not end with it (a final step's trailing
  EOS is dropped first: the PRM scores content, not the end marker).
- "chat": the PRM has its own chat format (Qwen2.5-Math-PRM): the question is cut out of the
  decoded policy prompt (`question_pattern`), each step's text is stripped of the step
  delimiter and whitespace, and the assistant turn is the steps joined by the tag, with a
  final tag: `s1<extra_0>s2<extra_0>`.

Either way exactly one score per step. vLLM's pooled rows are matched to step ends by tag
position, so a tag inside the prompt cannot shift scores. vLLM is imported lazily.

A third kind needs no reward model: `PolicySurpriseScorer` ("policy_surprise") scores a
step by the policy's own surprise so far, exp(min over the trace's tokens up to the step's
end of log p(token) - log max p), from vLLM's prompt log-probs of the trace under the
policy (`model` = the policy). A slip is usually a token the policy itself found unlikely;
on the testbed this ranks steps better than the trained PRM (benchmarks/prm_signals.py).
"""
from __future__ import annotations

import asyncio
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ttc_vllm.engine import REQUIRED_DTYPE_KEY
from ttc_vllm.search.protocols import Trace

QWEN_MATH_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_CHAT_USER_PATTERN = r"<\|im_start\|>user\n(.*?)<\|im_end\|>"


class PRMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pooling", "token_label", "policy_surprise"]
    model: str = Field(min_length=1)  # path or hub id (policy_surprise: the policy)
    # The single token of the PRM's vocabulary that closes each step ("<extra_0>" for
    # Qwen2.5-Math-PRM). None: no step tag, which only policy_surprise can do without.
    step_tag: str | None = Field(None, min_length=1)
    good_label: int = Field(1, ge=0)  # pooling: column of the "good" class
    # token_label: the good/bad tokens, as vocabulary entries ("+") or token ids
    good_token: str | int | None = None
    bad_token: str | int | None = None
    input_format: Literal["token_ids", "chat"] = "token_ids"
    # chat: how the question is found in the decoded policy prompt (first group of the last
    # match; None -> the whole decoded prompt), the system message, the delimiter to strip
    # from step texts, and the policy's tokenizer (None -> the PRM's) to decode the prompt.
    question_pattern: str | None = None
    system_prompt: str | None = None
    step_delimiter: str | None = "\n\n"
    policy_tokenizer: str | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra vllm.LLM arguments

    @model_validator(mode="after")
    def _kind_specific(self) -> "PRMConfig":
        if self.kind == "token_label":
            if self.good_token is None or self.bad_token is None:
                raise ValueError("good_token and bad_token are required for kind 'token_label'")
            if self.good_token == self.bad_token:
                raise ValueError("good_token and bad_token must differ")
        if self.question_pattern is not None:
            try:
                compiled = re.compile(self.question_pattern)
            except re.error as e:
                raise ValueError(f"question_pattern is not a valid regex: {e}") from None
            if compiled.groups < 1:
                raise ValueError("question_pattern needs one capturing group (the question)")
        for key in ("model", "runner", "convert"):
            if key in self.engine_kwargs:
                raise ValueError(f"engine_kwargs must not set {key!r}; it is set by the PRM kind")
        return self

    @classmethod
    def qwen25_math_prm(cls, model: str = "Qwen/Qwen2.5-Math-PRM-7B", **overrides: Any) -> "PRMConfig":
        """Qwen2.5-Math-PRM-7B/72B behind a Qwen2.5 chat policy (GPU)."""
        values: dict[str, Any] = dict(
            kind="pooling", model=model, step_tag="<extra_0>", good_label=1, input_format="chat",
            question_pattern=QWEN_CHAT_USER_PATTERN, system_prompt=QWEN_MATH_PRM_SYSTEM,
            step_delimiter="\n\n", engine_kwargs={"dtype": "bfloat16"},
        )
        values.update(overrides)
        return cls(**values)

    def require_step_tag(self) -> str:
        """The step tag, for the scorers that pool at it (pooling, token_label)."""
        if self.step_tag is None:
            raise ValueError(f"a {self.kind!r} PRM needs step_tag: the single token of its "
                             "vocabulary that closes each step")
        return self.step_tag


# -- inputs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PRMInput:
    """What the PRM sees for one trace, and where each step's tag sits in it."""

    token_ids: list[int]
    step_positions: list[int]  # index into token_ids of the tag that closes step k


def token_id_of(tokenizer, token: str | int) -> int:
    """The id of a single-token string (or an id, checked against the vocabulary)."""
    if isinstance(token, int):
        if not 0 <= token < len(tokenizer):
            raise ValueError(f"token id {token} is outside the vocabulary (size {len(tokenizer)})")
        return token
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk and token != tokenizer.unk_token):
        raise ValueError(f"{token!r} is not a single token of the PRM's vocabulary")
    return int(tid)


def token_ids_input(trace: Trace, tag_id: int, eos_id: int | None) -> PRMInput:
    """The trace's own token ids with each step closed by the tag (see module doc)."""
    ids = list(trace.prompt_ids)
    positions = []
    for step in trace.steps:
        step_ids = list(step.token_ids)
        if eos_id is not None:
            while step_ids and step_ids[-1] == eos_id:
                step_ids.pop()
        if not step_ids or step_ids[-1] != tag_id:
            step_ids.append(tag_id)
        ids.extend(step_ids)
        positions.append(len(ids) - 1)
    return PRMInput(ids, positions)


def clean_step_text(text: str, delimiter: str | None, tag: str) -> str:
    if delimiter and text.endswith(delimiter):
        text = text[: -len(delimiter)]
    return text.replace(tag, "").strip()


def extract_question(prompt_text: str, pattern: str | None) -> str:
    if pattern is None:
        return prompt_text.strip()
    matches = re.findall(pattern, prompt_text, flags=re.DOTALL)
    if not matches:
        raise ValueError(f"question_pattern {pattern!r} does not match the policy prompt "
                         f"{prompt_text[:80]!r}")
    last = matches[-1]
    return (last[0] if isinstance(last, tuple) else last).strip()


def chat_input(trace: Trace, config: PRMConfig, prm_tokenizer, policy_tokenizer,
               tag_id: int) -> PRMInput:
    """The PRM's chat rendering of the trace: system, user question, assistant steps each
    followed by the tag; the last len(steps) tags close the steps."""
    prompt_text = policy_tokenizer.decode(list(trace.prompt_ids), skip_special_tokens=False)
    question = extract_question(prompt_text, config.question_pattern)
    tag = config.require_step_tag()
    steps = [clean_step_text(s.text, config.step_delimiter, tag) for s in trace.steps]
    messages = []
    if config.system_prompt is not None:
        messages.append({"role": "system", "content": config.system_prompt})
    messages.append({"role": "user", "content": question})
    messages.append({"role": "assistant",
                     "content": "".join(s + tag for s in steps)})
    text = prm_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = list(prm_tokenizer.encode(text, add_special_tokens=False))
    tags = [i for i, t in enumerate(ids) if t == tag_id]
    if len(tags) < len(steps):
        raise ValueError(f"PRM input holds {len(tags)} step tags for {len(steps)} steps; "
                         f"is {tag!r} a single token of the PRM?")
    return PRMInput(ids, tags[len(tags) - len(steps):] if steps else [])


def step_scores(rows: Sequence[Sequence[float]], tag_positions: Sequence[int],
                step_positions: Sequence[int], good_column: int) -> list[float]:
    """Per-step P(good) from vLLM's STEP-pooled logit rows (one per tag position of the
    input, in order): softmax column `good_column`, or sigmoid of a single column."""
    if len(rows) != len(tag_positions):
        raise RuntimeError(f"PRM returned {len(rows)} rows for {len(tag_positions)} step tags")
    row_of = {pos: i for i, pos in enumerate(tag_positions)}
    out = []
    for pos in step_positions:
        logits = [float(x) for x in rows[row_of[pos]]]
        if not all(math.isfinite(v) for v in logits):
            # e.g. a float32 model served in float16 (vLLM's "auto" for pooling models)
            raise RuntimeError(f"PRM returned non-finite logits {logits}: its activations overflow "
                               "the engine's dtype; run it in float32 (engine_kwargs "
                               "{\"dtype\": \"float32\"}, or `vllm serve ... --dtype float32`)")
        if len(logits) == 1:
            out.append(1.0 / (1.0 + math.exp(-logits[0])))
            continue
        if good_column >= len(logits):
            raise ValueError(f"good_label {good_column} is out of range for a PRM head with "
                             f"{len(logits)} columns")
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        out.append(exps[good_column] / sum(exps))
    return out


# -- scorers ---------------------------------------------------------------------------------

def required_dtype(model: str) -> str | None:
    """The dtype a local PRM directory declares it must run in, if any."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get(REQUIRED_DTYPE_KEY)
    except (OSError, ValueError):
        return None


def pooling_llm_kwargs(config: PRMConfig) -> dict[str, Any]:
    """vllm.LLM arguments for a PRM config (CPU defaults from ttc_vllm.engine). A PRM that
    declares a required dtype gets it, and a config asking for another one is refused
    here, before any engine starts (vLLM's "auto" would run a float32 PRM in float16)."""
    from ttc_vllm.engine import engine_kwargs

    kwargs = engine_kwargs(config.model, runner="pooling", **config.engine_kwargs)
    kwargs.pop("logits_processors", None)  # pooling models reject logits processors
    need = required_dtype(config.model)
    if need is not None:
        asked = kwargs.get("dtype", "auto")
        if asked not in ("auto", need):
            raise ValueError(f"PRM {config.model} must run in {need} (its config.json "
                             f"{REQUIRED_DTYPE_KEY}); engine_kwargs asks for dtype {asked!r}")
        kwargs["dtype"] = need
    if config.kind == "token_label":
        from vllm.config import PoolerConfig

        good, bad = _token_strings(config)
        overrides = dict(kwargs.get("hf_overrides") or {})
        # Score head = LM-head rows [bad, good]; STEP pooling at the tag. The converted
        # model's default task is sequence "classify": ask for token_classify explicitly.
        overrides.update({"classifier_from_token": [bad, good], "method": "no_post_processing"})
        kwargs.update(convert="classify", hf_overrides=overrides,
                      pooler_config=PoolerConfig(task="token_classify", tok_pooling_type="STEP"))
    return kwargs


def _token_strings(config: PRMConfig) -> tuple[str, str]:
    """good/bad as vocabulary strings (vLLM's converter looks tokens up by string)."""
    tokens = [config.good_token, config.bad_token]
    if any(isinstance(t, int) for t in tokens):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(config.model)
        tokens = [tok.convert_ids_to_tokens(t) if isinstance(t, int) else t for t in tokens]
    return str(tokens[0]), str(tokens[1])


class _EngineScorer:
    """What every scorer shares: its vLLM engine, and the async `score` running the
    blocking `score_sync` on one worker thread (the engine is not thread-safe)."""

    def __init__(self, config: PRMConfig, llm=None):
        self.config = config
        self.llm = llm if llm is not None else self._build_llm(config)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ttc-prm")

    @staticmethod
    def _build_llm(config: PRMConfig):
        raise NotImplementedError

    async def score(self, traces: Sequence[Trace]) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.score_sync, list(traces))

    def score_sync(self, traces: Sequence[Trace]) -> list[list[float]]:
        raise NotImplementedError

    def close(self) -> None:
        self._executor.shutdown(wait=False)


class _PoolingScorer(_EngineScorer):
    """Shared body: build inputs, one `llm.encode` per call, map rows to steps."""

    good_column: int

    def __init__(self, config: PRMConfig, llm=None):
        tag = config.require_step_tag()  # before an engine starts
        super().__init__(config, llm)
        self.tokenizer = self.llm.get_tokenizer()
        self.tag_id = token_id_of(self.tokenizer, tag)
        self.eos_id = getattr(self.tokenizer, "eos_token_id", None)
        self._policy_tokenizer = None

    @staticmethod
    def _build_llm(config: PRMConfig):
        from vllm import LLM

        return LLM(**pooling_llm_kwargs(config))

    @property
    def policy_tokenizer(self):
        if self._policy_tokenizer is None:
            if self.config.policy_tokenizer is None:
                self._policy_tokenizer = self.tokenizer
            else:
                from transformers import AutoTokenizer

                self._policy_tokenizer = AutoTokenizer.from_pretrained(self.config.policy_tokenizer)
        return self._policy_tokenizer

    def prm_input(self, trace: Trace) -> PRMInput:
        if self.config.input_format == "chat":
            return chat_input(trace, self.config, self.tokenizer, self.policy_tokenizer, self.tag_id)
        return token_ids_input(trace, self.tag_id, self.eos_id)

    def score_sync(self, traces: Sequence[Trace]) -> list[list[float]]:
        from vllm import PoolingParams

        result: list[list[float] | None] = [None] * len(traces)
        inputs, order = [], []
        for i, trace in enumerate(traces):
            if not trace.steps:
                result[i] = []
                continue
            inputs.append(self.prm_input(trace))
            order.append(i)
        if inputs:
            # Raw logits (no activation): the softmax/sigmoid is ours, whatever the model's
            # config says about classifier activations.
            params = PoolingParams(step_tag_id=self.tag_id, use_activation=False)
            outs = self.llm.encode([{"prompt_token_ids": x.token_ids} for x in inputs], params,
                                   pooling_task="token_classify", use_tqdm=False)
            for i, x, out in zip(order, inputs, outs):
                rows = out.outputs.data.float().reshape(-1, out.outputs.data.shape[-1]).tolist()
                tags = [p for p, t in enumerate(x.token_ids) if t == self.tag_id]
                result[i] = step_scores(rows, tags, x.step_positions, self.good_column)
        return result  # type: ignore[return-value]


class VLLMPoolingPRM(_PoolingScorer):
    """A *ForProcessRewardModel (STEP pooling) as a StepScorer."""

    def __init__(self, config: PRMConfig, llm=None):
        if config.kind != "pooling":
            raise ValueError(f"VLLMPoolingPRM needs kind 'pooling', got {config.kind!r}")
        self.good_column = config.good_label
        super().__init__(config, llm)


class TokenLabelPRM(_PoolingScorer):
    """A good/bad-token causal-LM PRM (math-shepherd style) as a StepScorer."""

    good_column = 1  # the converted head's rows are [bad, good]

    def __init__(self, config: PRMConfig, llm=None):
        if config.kind != "token_label":
            raise ValueError(f"TokenLabelPRM needs kind 'token_label', got {config.kind!r}")
        super().__init__(config, llm)


class PolicySurpriseScorer(_EngineScorer):
    """The policy's own surprise as a StepScorer: a step scores exp(min over the completion
    up to its end of log p(token) - log max_v p(v)), in (0, 1], 1 while every token so far
    was the policy's top choice. One generation request per trace (max_tokens=1,
    prompt_logprobs=1: vLLM returns each token's log-prob and the top one)."""

    def __init__(self, config: PRMConfig, llm=None):
        if config.kind != "policy_surprise":
            raise ValueError(f"PolicySurpriseScorer needs kind 'policy_surprise', got {config.kind!r}")
        super().__init__(config, llm)

    @staticmethod
    def _build_llm(config: PRMConfig):
        from vllm import LLM

        from ttc_vllm.engine import engine_kwargs

        kwargs = engine_kwargs(config.model, **config.engine_kwargs)
        kwargs.pop("logits_processors", None)   # plain scoring: no thinking controls
        return LLM(**kwargs)

    def score_sync(self, traces: Sequence[Trace]) -> list[list[float]]:
        from vllm import SamplingParams

        todo = [t for t in traces if t.steps]
        prompts = [{"prompt_token_ids": list(t.prompt_ids) + [x for s in t.steps for x in s.token_ids]}
                   for t in todo]
        outs = iter(self.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1),
                                      use_tqdm=False) if prompts else [])
        return [surprise_scores(t, next(outs).prompt_logprobs) if t.steps else [] for t in traces]


def surprise_scores(trace: Trace, prompt_logprobs: Sequence[dict | None]) -> list[float]:
    """Per step of `trace`: exp(running min of log p(token) - log max p) over its completion
    tokens, from vLLM's `prompt_logprobs` of prompt + completion (entry k: {token id:
    Logprob} for token k, the token itself and the top ones)."""
    ids = list(trace.prompt_ids) + [x for s in trace.steps for x in s.token_ids]
    pos, running, out = len(trace.prompt_ids), 0.0, []
    for step in trace.steps:
        for k in range(pos, pos + len(step.token_ids)):
            entry = prompt_logprobs[k]
            values = {t: getattr(v, "logprob", v) for t, v in entry.items()}
            running = min(running, values[ids[k]] - max(values.values()))
        pos += len(step.token_ids)
        out.append(math.exp(running))
    return out


def make_scorer(config: PRMConfig, llm=None):
    """The StepScorer for a config (the PRM pool's factory calls this in each actor)."""
    cls = {"pooling": VLLMPoolingPRM, "token_label": TokenLabelPRM,
           "policy_surprise": PolicySurpriseScorer}[config.kind]
    return cls(config, llm)
