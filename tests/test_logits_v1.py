"""The V1-runner processor driven with BatchUpdates the way the persistent batch sends
them (adds, removals, condense moves, swaps), on the testbed tokenizer (no engine)."""
import json
from types import SimpleNamespace

import pytest
import torch

from ttc_vllm.testbed.tokenizer import build_tokenizer

pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from ttc_vllm_plugins import logits_common as common  # noqa: E402
from ttc_vllm_plugins.logits_v1 import TTCLogitsProcessorV1  # noqa: E402

TOK = build_tokenizer()
END = TOK.convert_tokens_to_ids("</think>")
V = len(TOK)
WORD = TOK.encode("7", add_special_tokens=False)[0]
PROMPT = [TOK.bos_token_id] + TOK.encode("Q: 1+2=?\n<think>", add_special_tokens=False)


def make_proc(max_seqs=8):
    ctx = common.EngineContext(TOK, common.EngineContext._markers(SimpleNamespace(), TOK), "testbed",
                               TOK.eos_token_id)
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max_seqs))
    return TTCLogitsProcessorV1(cfg, torch.device("cpu"), False, context=ctx)


def sp(ttc=None, max_tokens=200):
    return SamplingParams(max_tokens=max_tokens, extra_args={"ttc": json.dumps(ttc)} if ttc else None)


class Batch:
    def __init__(self, proc):
        self.proc = proc
        self.rows: list[list[int] | None] = []

    def update(self, added=(), removed=(), moved=()):
        for row, *_rest, out in added:
            while len(self.rows) <= row:
                self.rows.append(None)
            self.rows[row] = out
        for a, b, d in moved:
            if d == MoveDirectionality.SWAP:
                self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
            else:
                self.rows[b], self.rows[a] = self.rows[a], None
        for r in removed:
            self.rows[r] = None
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
        self.proc.update_state(BatchUpdate(len(self.rows), list(removed), list(added), list(moved)))

    def step(self, want=lambda row, out: WORD):
        self.proc.update_state(None)
        logits = torch.zeros(len(self.rows), V)
        for i, out in enumerate(self.rows):
            logits[i, want(i, out)] = 5.0
        before = logits.clone()
        self.proc.apply(logits)
        for i, out in enumerate(self.rows):
            out.append(int(logits[i].argmax()))
        return before, logits


def think_len(out):
    return out.index(END) if END in out else len(out)


def test_budget_per_row_and_uncontrolled_rows_untouched():
    proc = make_proc()
    b = Batch(proc)
    b.update(added=[(0, sp({"max_think": 5, "conclusion": None}), PROMPT, []),
                    (1, sp(None), PROMPT, []),
                    (2, sp({"max_think": 9, "conclusion": None}), PROMPT, [])])
    for _ in range(12):
        before, after = b.step()
        assert torch.equal(before[1], after[1])
    assert think_len(b.rows[0]) == 5 and think_len(b.rows[2]) == 9 and END not in b.rows[1]


def test_n_greater_than_one_children_are_independent_rows():
    proc = make_proc()
    b = Batch(proc)
    params = sp({"max_think": 4, "conclusion": None})
    b.update(added=[(0, params, PROMPT, []), (1, params, PROMPT, [])])
    b.step()
    b.step(lambda row, out: END if row == 1 else WORD)      # child 1 ends by itself
    for _ in range(4):
        b.step()
    assert think_len(b.rows[0]) == 4 and think_len(b.rows[1]) == 1


def test_condense_move_carries_state_and_records_the_finished_row():
    proc = make_proc()
    b = Batch(proc)
    b.update(added=[(0, sp({"max_think": 3, "conclusion": None}), PROMPT, []),
                    (1, sp({"max_think": 6, "conclusion": None}), PROMPT, []),
                    (2, sp({"max_think": 8, "conclusion": None}), PROMPT, [])])
    for _ in range(4):
        b.step()
    common.FINISHED.drain()
    # row 0 finished; condense moves row 2 into the hole (no removal entry for row 0)
    b.update(moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)])
    assert [(r.reason, r.thinking_tokens) for r in common.FINISHED.drain()] == [("budget", 3)]
    for _ in range(6):
        b.step()
    assert think_len(b.rows[0]) == 8      # the moved request kept its count and cap
    assert think_len(b.rows[1]) == 6


def test_swap_exchanges_state():
    proc = make_proc()
    b = Batch(proc)
    b.update(added=[(0, sp({"max_think": 2, "conclusion": None}), PROMPT, []),
                    (1, sp({"max_think": 7, "conclusion": None}), PROMPT, [])])
    b.step()
    b.update(moved=[(0, 1, MoveDirectionality.SWAP)])
    for _ in range(8):
        b.step()
    assert think_len(b.rows[1]) == 2 and think_len(b.rows[0]) == 7


def test_removed_then_added_into_same_row_is_fresh():
    proc = make_proc(max_seqs=2)
    b = Batch(proc)
    b.update(added=[(0, sp({"max_think": 2, "conclusion": None}), PROMPT, [])])
    for _ in range(3):
        b.step()
    b.update(removed=[0])
    b.update(added=[(0, sp({"max_think": 5, "conclusion": None}), PROMPT, [])])
    for _ in range(7):
        b.step()
    assert think_len(b.rows[0]) == 5
    assert len(proc.free_slots) == 1


def test_resumed_request_counts_its_output_and_placeholder_is_tolerated():
    proc = make_proc()
    b = Batch(proc)
    out = [WORD, WORD, WORD]            # re-added after preemption with 3 thinking tokens
    b.update(added=[(0, sp({"max_think": 6, "conclusion": None}), PROMPT, out)])
    b.step()
    b.rows[0][-1] = -1                  # async placeholder for the token just sampled
    for _ in range(5):
        b.step()
    # 3 + 1 (placeholder, uncounted) + 2 more counted = cap 6 reached one token late
    assert think_len(b.rows[0]) == 7


def test_engine_context_encodes_each_string_once_and_bounds_the_cache(monkeypatch):
    ctx = make_proc().ctx
    calls = []
    real = ctx.tokenizer.encode
    monkeypatch.setattr(ctx.tokenizer, "encode", lambda text, **kw: calls.append(text) or real(text, **kw))
    first = ctx.encode("Time to answer.")
    assert ctx.encode("Time to answer.") == first == tuple(real("Time to answer.", add_special_tokens=False))
    assert calls == ["Time to answer."]
    monkeypatch.setattr(common, "ENCODE_CACHE_SIZE", 3)
    for k in range(10):
        ctx.encode(f"wait {k}")
    assert len(ctx._encoded) <= 3


def test_a_request_whose_admission_raises_is_left_uncontrolled(caplog, monkeypatch):
    """Whatever raises while admitting one request (here: the controller's add) is logged,
    that request runs uncontrolled and its slot is free again; the batch goes on."""
    proc = make_proc(max_seqs=2)
    real_add = proc.ctrl.add

    def add(slot, p):
        if p.think_cap == 7:
            raise OverflowError("Python int too large to convert to C long")
        real_add(slot, p)

    monkeypatch.setattr(proc.ctrl, "add", add)
    b = Batch(proc)
    with caplog.at_level("ERROR", logger="ttc_vllm.plugins"):
        b.update(added=[(0, sp({"max_think": 7, "conclusion": None}), PROMPT, []),
                        (1, sp({"max_think": 5, "conclusion": None}), PROMPT, [])])
    assert "uncontrolled" in caplog.text and "OverflowError" in caplog.text
    assert len(proc.free_slots) == 1   # row 0's slot went back
    for _ in range(10):
        b.step()
    assert think_len(b.rows[0]) == 10 and think_len(b.rows[1]) == 5
