"""The Model Runner V2 processor driven like V2's sampler drives it, on fake request state
with real tensors (V2 itself needs Triton/GPU). Also the dual-interface entry class."""
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ttc_vllm.testbed.tokenizer import build_tokenizer

pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import (  # noqa: E402
    LogitsContext, LogitsProcessor as V2Base, LogitsProcRequestState)

from ttc_vllm_plugins import logits_common as common  # noqa: E402
from ttc_vllm_plugins.logits import TTCLogitsProcessor  # noqa: E402
from ttc_vllm_plugins.logits_v2 import TTCLogitsProcessorV2  # noqa: E402

TOK = build_tokenizer()
START, END = TOK.convert_tokens_to_ids("<think>"), TOK.convert_tokens_to_ids("</think>")
EOS = TOK.eos_token_id
V = len(TOK)
WORD = TOK.encode("7", add_special_tokens=False)[0]
MAX_REQS, MAX_LEN = 6, 128


@pytest.fixture(autouse=True, params=["eager", "numba"])
def step_backend(request, monkeypatch):
    """V2 runs on GPUs, where the controller takes the torch step (eager); the CPU kernel
    is driven through the same interface too."""
    monkeypatch.setenv("TTC_VLLM_STEP", request.param)
    return request.param


def context():
    ctx = common.EngineContext(TOK, None, "testbed", EOS)
    ctx.markers = common.EngineContext._markers(SimpleNamespace(), TOK)
    return ctx


class Staged:      # StagedWriteTensor-shaped: the device tensor is `.gpu`
    def __init__(self, t):
        self.gpu = t


class Uva:         # UvaBackedTensor-shaped: host `.np` mirrored into `.gpu`
    def __init__(self, n):
        self.cpu = torch.zeros(n, dtype=torch.int32)
        self.np = self.cpu.numpy()
        self.gpu = self.cpu.clone()

    def copy_to_uva(self):
        self.gpu = torch.from_numpy(self.np.copy())


class FakeRunner:
    """Just enough of V2's RequestState + sampler loop: slots, device history, contexts."""

    def __init__(self, proc_cls=TTCLogitsProcessorV2, **kw):
        self.all_token_ids = Staged(torch.zeros(MAX_REQS, MAX_LEN, dtype=torch.int32))
        self.total_len = Staged(torch.zeros(MAX_REQS, dtype=torch.int32))
        self.prompt_len, self.prefill_len = Uva(MAX_REQS), Uva(MAX_REQS)
        self.state = LogitsProcRequestState(
            device=torch.device("cpu"), max_num_reqs=MAX_REQS, vocab_size=V,
            all_token_ids=self.all_token_ids, prompt_len=self.prompt_len,
            prefill_len=self.prefill_len, total_len=self.total_len)
        self.proc = proc_cls(SimpleNamespace(), self.state, **kw)
        self.live: dict[int, list[int]] = {}      # slot -> output ids
        self.prompts: dict[int, int] = {}

    def add(self, slot, prompt_ids, params):
        n = len(prompt_ids)
        self.all_token_ids.gpu[slot, :n] = torch.tensor(prompt_ids, dtype=torch.int32)
        self.prompt_len.np[slot] = n
        self.prefill_len.np[slot] = n
        self.total_len.gpu[slot] = n
        self.live[slot] = []
        self.prompts[slot] = n
        return self.proc.add_request(slot, params)

    def finish(self, slot):
        self.live.pop(slot)

    def step(self, want, rng):
        """One decode step over live slots in a shuffled batch order; want(slot, out) is
        the fake model's preferred token. Returns the logits after the processor."""
        self.prompt_len.copy_to_uva()
        self.proc.apply_staged_writes()
        order = list(self.live)
        rng.shuffle(order)
        idx = torch.tensor(order, dtype=torch.int32)
        logits = torch.zeros(len(order), V)
        for row, slot in enumerate(order):
            logits[row, want(slot, self.live[slot])] = 5.0
        ctx = LogitsContext(
            expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.array(order, dtype=np.int32),
            expanded_local_pos=torch.zeros(len(order), dtype=torch.int32),
            input_ids=torch.zeros(len(order), dtype=torch.int32),
            pos=torch.zeros(len(order), dtype=torch.int32),
            seq_lens_upper_bound_np=np.zeros(len(order), dtype=np.int32))
        out = self.proc.apply(logits, ctx)
        for row, slot in enumerate(order):       # V2's post_update: commit on device
            tok = int(out[row].argmax())
            pos = int(self.total_len.gpu[slot])
            self.all_token_ids.gpu[slot, pos] = tok
            self.total_len.gpu[slot] = pos + 1
            self.live[slot].append(tok)
        return out, order


def prompt_ids(text="Q: 1+2=?\n<think>"):
    return [TOK.bos_token_id] + TOK.encode(text, add_special_tokens=False)


def sp(ttc=None, max_tokens=100, **kw):
    extra = {"ttc": json.dumps(ttc)} if ttc is not None else None
    return SamplingParams(max_tokens=max_tokens, extra_args=extra, **kw)


def thinking(out):
    return out[:out.index(END)] if END in out else out


def test_budget_min_and_untouched_rows_through_v2_interface():
    r = FakeRunner(context=context())
    rng = random.Random(0)
    conc = TOK.encode("\nTime is up, concluding.", add_special_tokens=False)
    assert r.add(0, prompt_ids(), sp({"max_think": 30}))
    assert r.add(3, prompt_ids(), sp({"min_think": 10, "continuation": "\nWait,"}))
    assert not r.add(5, prompt_ids(), sp(None))                    # no ttc: declined
    want = {0: lambda o: WORD, 3: lambda o: END, 5: lambda o: END}
    plain_rows = []
    for _ in range(40):
        out, order = r.step(lambda s, o: want[s](o), rng)
        plain_rows.append(out[order.index(5)].clone())
    t0 = thinking(r.live[0])
    assert len(t0) == 30 and t0[-len(conc):] == conc and r.live[0][30] == END
    t3 = thinking(r.live[3])
    assert len(t3) >= 10 and END in r.live[3]
    # the uncontrolled request saw raw logits every step
    for row in plain_rows:
        assert int(row.argmax()) == END and row[END] == 5.0 and torch.isfinite(row).all()


def test_prompt_without_think_waits_for_model_to_open_it():
    r = FakeRunner(context=context())
    r.add(2, prompt_ids("Q: 1+2=?\n"), sp({"max_think": 4, "conclusion": None}))
    rng = random.Random(1)
    for _ in range(8):
        r.step(lambda s, o: START if not o else WORD, rng)
    out = r.live[2]
    assert out[0] == START and out[1:6] == [WORD] * 4 + [END]


def test_slot_reuse_and_answer_reserve():
    r = FakeRunner(context=context())
    rng = random.Random(2)
    r.add(1, prompt_ids(), sp({"max_think": 3, "conclusion": None}))
    for _ in range(5):
        r.step(lambda s, o: WORD, rng)
    assert r.live[1][:4] == [WORD] * 3 + [END]
    r.finish(1)
    common.FINISHED.drain()
    # a new request in the same slot: fresh state; the answer reserve binds (20-16-1 = 3)
    r.add(1, prompt_ids(), sp({"conclusion": None}, max_tokens=20))
    records = common.FINISHED.drain()
    assert [(x.reason, x.thinking_tokens) for x in records] == [("budget", 3)]
    for _ in range(6):
        r.step(lambda s, o: WORD, rng)
    assert r.live[1][:4] == [WORD] * 3 + [END]


def test_resumed_history_counts_prior_thinking():
    """Preemption resumes with prompt + partial output as prefill: it counts."""
    r = FakeRunner(context=context())
    p = prompt_ids()
    partial = [WORD] * 5
    n = len(p) + len(partial)
    r.all_token_ids.gpu[4, :n] = torch.tensor(p + partial, dtype=torch.int32)
    r.prompt_len.np[4], r.prefill_len.np[4] = len(p), n
    r.total_len.gpu[4] = n
    r.live[4] = []
    r.proc.add_request(4, sp({"max_think": 8, "conclusion": None}))
    rng = random.Random(3)
    for _ in range(5):
        r.step(lambda s, o: WORD, rng)
    assert r.live[4][:4] == [WORD] * 3 + [END]


def test_apply_skips_batches_without_ttc_rows():
    r = FakeRunner(context=context())
    r.add(0, prompt_ids(), sp(None))
    logits, order = r.step(lambda s, o: WORD, random.Random(0))
    assert int(logits[0].argmax()) == WORD and torch.isfinite(logits).all()


def test_entry_class_subclasses_both_interfaces_and_dispatches_v2(monkeypatch):
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1Base

    assert issubclass(TTCLogitsProcessor, V1Base) and issubclass(TTCLogitsProcessor, V2Base)
    assert not TTCLogitsProcessor.__abstractmethods__
    monkeypatch.setattr(common.EngineContext, "from_vllm_config", classmethod(lambda cls, c: context()))
    r = FakeRunner(proc_cls=TTCLogitsProcessor)
    assert r.proc.runner == "v2" and r.proc.active and not r.proc.is_argmax_invariant()
    r.add(0, prompt_ids(), sp({"max_think": 2, "conclusion": None}))
    rng = random.Random(0)
    for _ in range(4):
        r.step(lambda s, o: WORD, rng)
    assert r.live[0][:3] == [WORD, WORD, END]
    # a second instance for the same engine config stays passive (entry point + explicit)
    cfg = SimpleNamespace()
    first = TTCLogitsProcessor(cfg, r.state)
    dup = TTCLogitsProcessor(cfg, r.state)
    assert first.active and not dup.active and dup.add_request(0, sp({"max_think": 1})) is False


def test_validate_params_rejects_bad_options_naming_field():
    with pytest.raises(ValueError, match=r"ttc\.max_think"):
        TTCLogitsProcessor.validate_params(sp({"max_think": -5}))
    with pytest.raises(ValueError, match=r"ttc\.halting\.threshold"):
        TTCLogitsProcessorV2.validate_params(sp({"halting": {"threshold": -1}}))
    TTCLogitsProcessor.validate_params(sp({"max_think": 5}))
    TTCLogitsProcessor.validate_params(sp(None))


def test_draft_rows_and_padding_rows_are_left_alone():
    r = FakeRunner(context=context())
    r.add(1, prompt_ids(), sp({"max_think": 0, "conclusion": None}))
    r.proc.apply_staged_writes()
    # rows: slot 1 (local pos 0), a draft row of slot 1 (local pos 1), a padding row (-1)
    mapping = torch.tensor([1, 1, -1], dtype=torch.int32)
    ctx = LogitsContext(
        expanded_idx_mapping=mapping, idx_mapping=torch.tensor([1], dtype=torch.int32),
        idx_mapping_np=np.array([1], dtype=np.int32),
        expanded_local_pos=torch.tensor([0, 1, 0], dtype=torch.int32),
        input_ids=torch.zeros(3, dtype=torch.int32), pos=torch.zeros(3, dtype=torch.int32),
        seq_lens_upper_bound_np=np.zeros(1, dtype=np.int32))
    logits = torch.randn(3, V)
    before = logits.clone()
    r.proc.apply(logits, ctx)
    assert int(logits[0].argmax()) == END and torch.isinf(logits[0]).sum() == V - 1
    assert torch.equal(logits[1:], before[1:])
