"""PRM scorers: config validation, PRM inputs (token ids and chat), row->step mapping, one
score per step; real-engine checks that vLLM's scores equal a torch forward."""
import asyncio
import gc
import itertools
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from ttc_vllm.prm.scorers import (
    PolicySurpriseScorer, PRMConfig, TokenLabelPRM, VLLMPoolingPRM, chat_input,
    clean_step_text, extract_question, make_scorer, pooling_llm_kwargs, step_scores,
    surprise_scores, token_id_of, token_ids_input,
)
from ttc_vllm.testbed.tokenizer import load_testbed_tokenizer
from ttc_vllm.search.protocols import Step, StepScorer, Trace
from ttc_vllm.testbed import prm_scorer_config, task

TOK = load_testbed_tokenizer()
TAG = TOK.convert_tokens_to_ids(task.STEP_TAG)
EOS = TOK.eos_token_id
PROMPT = tuple(TOK.encode(task.prompt(task.Problem((3, 4))), add_special_tokens=False))


def enc(text):
    return tuple(TOK.encode(text, add_special_tokens=False))


def step(text, finished=False, eos=False):
    return Step(enc(text) + ((EOS,) if eos else ()), text, finished)


TRACE = Trace(PROMPT, (step("\n3+4=7<step>"), step("\n</think>\nAnswer: 7", True, eos=True)))


# -- config ------------------------------------------------------------------------------

def test_token_label_needs_both_tokens():
    with pytest.raises(ValidationError, match="good_token and bad_token"):
        PRMConfig(kind="token_label", model="m", good_token="+")
    with pytest.raises(ValidationError, match="must differ"):
        PRMConfig(kind="token_label", model="m", good_token="+", bad_token="+")


def test_config_rejects_bad_fields_by_name():
    with pytest.raises(ValidationError, match="kind"):
        PRMConfig(kind="outcome", model="m")
    with pytest.raises(ValidationError, match="good_label"):
        PRMConfig(kind="pooling", model="m", good_label=-1)
    with pytest.raises(ValidationError, match="capturing group"):
        PRMConfig(kind="pooling", model="m", question_pattern="Q: .*")
    with pytest.raises(ValidationError, match="runner"):
        PRMConfig(kind="pooling", model="m", engine_kwargs={"runner": "generate"})
    with pytest.raises(ValidationError, match="extra"):
        PRMConfig(kind="pooling", model="m", step_tags="<step>")


def test_qwen_math_prm_preset():
    cfg = PRMConfig.qwen25_math_prm()
    assert (cfg.kind, cfg.step_tag, cfg.good_label, cfg.input_format) == \
        ("pooling", "<extra_0>", 1, "chat")
    assert cfg.model == "Qwen/Qwen2.5-Math-PRM-7B"
    assert extract_question("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 2+2?"
                            "<|im_end|>\n<|im_start|>assistant\n", cfg.question_pattern) == "What is 2+2?"


def test_a_prm_that_declares_its_dtype_gets_it_and_refuses_another(tmp_path):
    from ttc_vllm.engine import REQUIRED_DTYPE_KEY

    (tmp_path / "config.json").write_text(json.dumps({REQUIRED_DTYPE_KEY: "float32"}))
    assert pooling_llm_kwargs(PRMConfig(kind="pooling", model=str(tmp_path)))["dtype"] == "float32"
    same = PRMConfig(kind="pooling", model=str(tmp_path), engine_kwargs={"dtype": "float32"})
    assert pooling_llm_kwargs(same)["dtype"] == "float32"
    with pytest.raises(ValueError, match="must run in float32.*'float16'"):
        pooling_llm_kwargs(PRMConfig(kind="pooling", model=str(tmp_path), engine_kwargs={"dtype": "float16"}))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForProcessRewardModel"]}))
    assert "dtype" not in pooling_llm_kwargs(PRMConfig(kind="pooling", model=str(tmp_path)))


def test_the_shipped_testbed_prm_runs_in_float32():
    assert pooling_llm_kwargs(prm_scorer_config())["dtype"] == "float32"


def test_pooling_kwargs_per_kind():
    kw = pooling_llm_kwargs(PRMConfig(kind="pooling", model="/m", engine_kwargs={"max_model_len": 300}))
    assert kw["runner"] == "pooling" and kw["model"] == "/m" and kw["max_model_len"] == 300
    assert "convert" not in kw and "logits_processors" not in kw
    kw = pooling_llm_kwargs(PRMConfig(kind="token_label", model="/m", good_token="+", bad_token="-"))
    assert kw["convert"] == "classify"
    assert kw["hf_overrides"] == {"classifier_from_token": ["-", "+"], "method": "no_post_processing"}
    assert (kw["pooler_config"].task, kw["pooler_config"].tok_pooling_type) == ("token_classify", "STEP")


# -- inputs ------------------------------------------------------------------------------

def test_token_ids_input_closes_every_step_with_the_tag():
    x = token_ids_input(TRACE, TAG, EOS)
    # the final step lost its EOS and gained the tag
    assert x.token_ids == list(PROMPT + enc("\n3+4=7<step>\n</think>\nAnswer: 7<step>"))
    assert [x.token_ids[p] for p in x.step_positions] == [TAG, TAG]
    assert x.step_positions == [len(PROMPT) + len(enc("\n3+4=7<step>")) - 1, len(x.token_ids) - 1]


def test_token_id_of():
    assert token_id_of(TOK, "<step>") == TAG
    assert token_id_of(TOK, 5) == 5
    with pytest.raises(ValueError, match="single token"):
        token_id_of(TOK, "<nope>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_id_of(TOK, 10**6)


def test_chat_input_renders_question_and_tagged_steps():
    cfg = PRMConfig(kind="pooling", model="m", input_format="chat", question_pattern=r"Q: (.*?)\n",
                    step_tag=task.STEP_TAG, step_delimiter="<step>")
    x = chat_input(TRACE, cfg, TOK, TOK, TAG)
    # testbed chat template: bos + "Q: {user}\n" + assistant content
    expected = enc("<s>Q: 3+4=?\n3+4=7<step></think>\nAnswer: 7<step>")
    assert x.token_ids == list(expected)
    assert [x.token_ids[p] for p in x.step_positions] == [TAG, TAG]
    assert x.step_positions[-1] == len(expected) - 1
    assert clean_step_text("\nfoo\n\n", "\n\n", "<extra_0>") == "foo"


def test_chat_input_without_a_match_is_a_clear_error():
    cfg = PRMConfig(kind="pooling", model="m", input_format="chat", question_pattern=r"Question: (.*)")
    with pytest.raises(ValueError, match="question_pattern"):
        chat_input(TRACE, cfg, TOK, TOK, TAG)


# -- scores ------------------------------------------------------------------------------

def test_step_scores_softmax_column_mapped_by_tag_position():
    rows = [[0.0, 0.0], [0.0, math.log(3)], [2.0, 0.0]]  # tags at 4 (in the prompt), 9, 12
    assert step_scores(rows, [4, 9, 12], [9, 12], 1) == [pytest.approx(0.75),
                                                         pytest.approx(1 / (1 + math.e**2))]
    assert step_scores(rows, [4, 9, 12], [12], 0) == [pytest.approx(math.e**2 / (1 + math.e**2))]
    assert step_scores([[0.0]], [3], [3], 1) == [pytest.approx(0.5)]  # one column: sigmoid
    with pytest.raises(RuntimeError, match="rows"):
        step_scores(rows, [9, 12], [9, 12], 1)
    with pytest.raises(ValueError, match="good_label"):
        step_scores([[0.0, 1.0]], [3], [3], 2)


class FakePoolingLLM:
    """encode() returns, per tag of the prompt, the row [0, position]: P(good) = sigmoid(pos)."""

    def __init__(self):
        self.calls = []

    def get_tokenizer(self):
        return TOK

    def encode(self, prompts, params, pooling_task=None, use_tqdm=True):
        self.calls.append((prompts, params, pooling_task))
        outs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            rows = [[0.0, float(i)] for i, t in enumerate(ids) if t == params.step_tag_id]
            outs.append(SimpleNamespace(outputs=SimpleNamespace(data=torch.tensor(rows).reshape(-1, 2))))
        return outs


def test_scorer_one_batched_call_one_score_per_step():
    llm = FakePoolingLLM()
    scorer = make_scorer(prm_scorer_config(model="unused"), llm=llm)
    assert isinstance(scorer, VLLMPoolingPRM) and isinstance(scorer, StepScorer)
    short = Trace(PROMPT, (step("\n3+4=7<step>"),))
    scores = asyncio.run(scorer.score([TRACE, Trace(PROMPT), short]))
    assert len(llm.calls) == 1 and len(llm.calls[0][0]) == 2  # the empty trace is not sent
    prompts, params, task_name = llm.calls[0]
    assert task_name == "token_classify" and params.step_tag_id == TAG and params.use_activation is False
    x = token_ids_input(TRACE, TAG, EOS)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert scores[0] == [pytest.approx(sig(p)) for p in x.step_positions]
    assert scores[1] == []
    assert len(scores[2]) == 1


def test_kind_mismatch_is_rejected():
    with pytest.raises(ValueError, match="kind 'token_label'"):
        TokenLabelPRM(prm_scorer_config(model="unused"), llm=FakePoolingLLM())


def test_surprise_scores_hand_computed():
    """exp(running min of log p(token) - log max p) at each step end; prompt tokens do
    not count."""
    trace = Trace((1, 2), (Step((5, 6), "a", False), Step((7,), "b", True)))
    lp = [None, {2: -9.0, 3: -0.1},                        # prompt: ignored
          {5: -0.2},                                       # 5 is the top token: 0
          {6: -3.0, 4: -0.5},                              # 6 is 2.5 below the top
          {7: -1.0, 8: -0.9}]                              # 0.1 below: the min stays -2.5
    assert surprise_scores(trace, lp) == [pytest.approx(math.exp(-2.5))] * 2
    assert surprise_scores(Trace((1,), (Step((5,), "a", True),)), [None, {5: -0.3}]) == [1.0]


def test_policy_surprise_kind_and_dispatch():
    cfg = PRMConfig(kind="policy_surprise", model="policy")
    scorer = make_scorer(cfg, llm=object())
    assert isinstance(scorer, PolicySurpriseScorer) and isinstance(scorer, StepScorer)
    with pytest.raises(ValueError, match="kind 'policy_surprise'"):
        PolicySurpriseScorer(prm_scorer_config(model="unused"), llm=object())
    assert scorer.score_sync([Trace(PROMPT)]) == [[]]   # nothing to send


# -- real engine -------------------------------------------------------------------------

ENGINE = {"kv_cache_memory_bytes": 128 << 20, "max_model_len": 512}
ENGINE_TRACES = [
    TRACE,
    Trace(PROMPT, (step("\n3+4=8<step>"), step("check 3+4=8<step>"),
                   step("\n</think>\nAnswer: 8", True, eos=True))),
    Trace(PROMPT, (step("\n4+3=7<step>"),)),
]


def _shutdown(scorer):
    scorer.llm.llm_engine.engine_core.shutdown()
    gc.collect()


@pytest.fixture(scope="module")
def policy_dir():
    """The testbed policy (TTC_VLLM_POLICY overrides, as in conftest's `llm`)."""
    from ttc_vllm.testbed import policy_path

    return Path(os.environ.get("TTC_VLLM_POLICY", policy_path()))


@pytest.mark.engine
def test_vllm_pooling_prm_matches_torch(tmp_path_factory, policy_dir):
    """A Qwen2ForProcessRewardModel saved by the testbed trainer (policy backbone + one new
    layer, all of it perturbed, random head) loads in vLLM and scores like the torch module."""
    from ttc_vllm.testbed.train_prm import build_model, predict, save

    torch.manual_seed(0)
    model, config, _ = build_model(policy_dir, extra_layers=1)
    with torch.no_grad():  # the new layer must matter: its zeroed projections get weights
        for p in model.model.layers[-1].parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("prm")
    save(model, config, policy_dir, out)
    scorer = VLLMPoolingPRM(prm_scorer_config(model=str(out), engine_kwargs=ENGINE))
    try:
        got = scorer.score_sync(ENGINE_TRACES)
    finally:
        _shutdown(scorer)
    want = predict(model, [token_ids_input(t, TAG, EOS) for t in ENGINE_TRACES], config.pad_token_id)
    assert [len(g) for g in got] == [len(t.steps) for t in ENGINE_TRACES]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=2e-3)


@pytest.mark.engine
def test_token_label_prm_equals_two_token_softmax_of_the_lm(policy_dir):
    """The policy as a token-label PRM (good = "\\n", bad = "c"): vLLM's score is
    softmax([logit_bad, logit_good])[1] of the causal LM's logits at each tag."""
    from transformers import AutoModelForCausalLM

    good, bad = enc("\n")[0], enc("c")[0]
    cfg = PRMConfig(kind="token_label", model=str(policy_dir), good_token=good, bad_token=bad,
                    step_tag=task.STEP_TAG, engine_kwargs=ENGINE)
    scorer = TokenLabelPRM(cfg)
    try:
        got = scorer.score_sync(ENGINE_TRACES)
    finally:
        _shutdown(scorer)
    lm = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32).eval()
    for trace, g in zip(ENGINE_TRACES, got):
        x = token_ids_input(trace, TAG, EOS)
        with torch.no_grad():
            logits = lm(torch.tensor([x.token_ids])).logits[0]
        want = [torch.softmax(logits[p, [bad, good]], -1)[1].item() for p in x.step_positions]
        assert g == pytest.approx(want, abs=2e-3)


@pytest.mark.engine
def test_policy_surprise_matches_torch_and_marks_a_slip(llm, policy_dir):
    """Through the session's policy engine (prefix caching on): scores equal the torch
    forward's (to the engine's bfloat16), and a step with a digit the policy did not expect (3+4=8) scores below the
    right one, and so does every step after it."""
    from transformers import AutoModelForCausalLM

    scorer = PolicySurpriseScorer(PRMConfig(kind="policy_surprise", model=str(policy_dir)), llm=llm)
    got = scorer.score_sync(ENGINE_TRACES + [Trace(PROMPT)])
    assert got[-1] == [] and [len(g) for g in got[:-1]] == [len(t.steps) for t in ENGINE_TRACES]
    lm = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32).eval()
    for trace, g in zip(ENGINE_TRACES, got):
        ids = list(trace.prompt_ids) + [x for st in trace.steps for x in st.token_ids]
        with torch.no_grad():
            lp = torch.log_softmax(lm(torch.tensor([ids])).logits[0], -1)
        margin = [(lp[k - 1, ids[k]] - lp[k - 1].max()).item() for k in range(len(trace.prompt_ids), len(ids))]
        ends = list(itertools.accumulate(len(st.token_ids) for st in trace.steps))
        want = [math.exp(min(0.0, *margin[:e])) for e in ends]
        # the engine runs the policy in bfloat16: log-probs agree to a few hundredths
        assert [math.log(x) for x in g] == pytest.approx([math.log(x) for x in want], rel=0.05, abs=0.05)
    right, wrong = got[0], got[1]
    assert wrong[0] < right[0] and max(wrong) <= wrong[0]
