"""The batched controller driven directly with hand-made logits (no engine)."""
import math
import random

import numpy as np
import pytest
import torch

from ttc_vllm import control as C
from ttc_vllm import halting as H

V = 40
START, END, EOS = 1, 2, 3
CONC = (20, 21, 22)
CONT = (30, 31)
WORD = 7
MARKERS = C.Markers(START, END)


def ctrl(slots=4, **kw):
    return C.ThinkingController(slots, MARKERS, **kw)


def params(**kw):
    base = dict(conclusion_ids=CONC, continuation_ids=CONT, suppress_ids=(EOS,), eos_id=EOS,
                phase=C.PHASE_THINKING)
    base.update(kw)
    return C.SlotParams(**base)


def prefer(token, rows=1):
    """Logits whose argmax is `token` (everything else lower)."""
    lg = torch.zeros(rows, V)
    lg[:, token] = 5.0
    return lg


def greedy_run(c, slot_list, steps, want, outs=None, rows=None, placeholder=lambda t, r: False,
               dtype=torch.float32):
    """Drive `steps` steps; want(t, row, out) -> preferred token of the fake model."""
    outs = outs if outs is not None else [[] for _ in slot_list]
    for t in range(steps):
        lg = torch.stack([prefer(want(t, i, outs[i]))[0] for i in range(len(slot_list))]).to(dtype)
        last = [(-1 if placeholder(t, i) else o[-1]) if o else -1 for i, o in enumerate(outs)]
        c.step(lg, torch.tensor(slot_list), torch.tensor(last), torch.tensor([len(o) for o in outs]), rows)
        for i in range(len(slot_list)):
            outs[i].append(int(lg[i].argmax()))
    return outs


def thinking_len(out):
    return out.index(END) if END in out else len(out)


def test_budget_forces_conclusion_then_end_within_cap():
    c = ctrl()
    c.add(0, params(think_cap=7))
    out = greedy_run(c, [0], 12, lambda t, i, o: WORD)[0]
    # 4 free tokens + 3 conclusion tokens = 7 thinking tokens, then </think>, then free again
    assert out[:9] == [WORD] * 4 + list(CONC) + [END] + [WORD]
    rec = c.remove(0)
    assert (rec.reason, rec.thinking_tokens, rec.stop_step, rec.phase) == ("budget", 7, 4, "answering")


def test_cap_smaller_than_conclusion_forces_end_only():
    c = ctrl()
    c.add(0, params(think_cap=2))
    assert greedy_run(c, [0], 3, lambda t, i, o: WORD)[0] == [END, WORD, WORD]
    c.add(1, params(think_cap=0, conclusion_ids=()))      # effort "none"
    assert greedy_run(c, [1], 2, lambda t, i, o: WORD)[0] == [END, WORD]


def test_output_limit_reserves_the_answer():
    # Prompt did not open thinking: the model writes <think> itself (an output token too).
    c = ctrl()
    c.add(0, params(phase=C.PHASE_BEFORE, out_limit=6))
    out = greedy_run(c, [0], 10, lambda t, i, o: START if t == 0 else WORD)[0]
    assert out[:8] == [START, WORD, WORD] + list(CONC) + [END, WORD]
    assert out.index(END) == 6            # </think> at output position out_limit


def test_min_think_suppresses_end_and_injects_continuation():
    c = ctrl()
    c.add(0, params(min_think=8, max_extensions=5))
    # The model wants to end thinking from its 2nd token on.
    out = greedy_run(c, [0], 14, lambda t, i, o: WORD if t == 0 else END)[0]
    # count: WORD(1) + Wait(2) -> 3; + Wait(2) -> 5; + Wait(2) -> 7; + Wait -> 9 >= 8; then END
    assert out[:10] == [WORD, *CONT, *CONT, *CONT, *CONT, END]
    assert thinking_len(out) == 9 >= 8
    rec = c.remove(0)
    assert (rec.extensions, rec.reason, rec.stop_step) == (4, "natural", 9)


def test_min_think_after_max_extensions_still_blocks_end():
    c = ctrl()
    c.add(0, params(min_think=5, max_extensions=1))
    want = lambda t, i, o: END                            # noqa: E731
    # Next best token after END is 0 (all others tie at 0; argmax picks the first).
    out = greedy_run(c, [0], 8, want)[0]
    assert out[:2] == list(CONT)
    assert END not in out[:5] and out[5] == END
    assert c.record(0).extensions == 1


def test_min_think_blocks_eos_too_and_sampled_mass():
    c = ctrl()
    c.add(0, params(min_think=3, max_extensions=0))
    lg = torch.zeros(1, V)
    c.step(lg, torch.tensor([0]), torch.tensor([-1]), torch.tensor([0]))
    assert lg[0, END] == -math.inf and lg[0, EOS] == -math.inf and lg[0, WORD] == 0


def confidence_logits(target):
    """Logits over two tokens (rest -inf) whose top-2 token confidence is `target`."""
    # C = -(ln p + ln(1-p))/2  ->  solve for p >= .5 by bisection
    lo, hi = 0.5, 1 - 1e-9
    for _ in range(100):
        mid = (lo + hi) / 2
        if -(math.log(mid) + math.log(1 - mid)) / 2 < target:
            lo = mid
        else:
            hi = mid
    lg = torch.full((1, V), -math.inf)
    lg[0, WORD] = math.log(lo)
    lg[0, WORD + 1] = math.log(1 - lo)
    return lg


def halting_params(tau, above=True, stop=False, min_tokens=0, window=1, aggregate=H.AGG_TAIL):
    return C.HaltingParams(H.SIGNAL_TOKEN, aggregate, 20, window, tau, above, stop, min_tokens)


def drive_confidences(c, slot, confs):
    out = []
    for conf in confs:
        lg = confidence_logits(conf)
        c.step(lg, torch.tensor([slot]), torch.tensor([out[-1] if out else -1]), torch.tensor([len(out)]))
        out.append(int(lg.argmax()))
    return out


def test_halting_concludes_when_confidence_exceeds_tau():
    c = ctrl()
    c.add(0, params(halting=halting_params(tau=2.0, min_tokens=3)))
    # C = 1.0 at token 0, 2.5 at token 1 (decided after 2 < min_tokens tokens), 1.5, 3.0.
    out = drive_confidences(c, 0, [1.0, 2.5, 1.5, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # Token 3's confidence is known once token 3 is sampled: forcing starts at token 4.
    assert out[:4] == [WORD] * 4 and out[4:8] == [*CONC, END]
    rec = c.record(0)
    assert (rec.reason, rec.stop_step) == ("halt", 4)


def test_halting_min_tokens_blocks_early_trigger():
    c = ctrl()
    c.add(0, params(halting=halting_params(tau=2.0, min_tokens=3)))
    out = drive_confidences(c, 0, [3.0, 3.0, 0.1, 0.1, 0.1])
    # f after 2 tokens = 3.0 but only 2 < 3 thinking tokens; after 3 tokens f = 0.1
    assert CONC[0] not in out


def test_halting_stop_forces_eos_and_direction_below():
    c = ctrl()
    c.add(0, params(halting=halting_params(tau=1.0, above=False, stop=True)))
    out = drive_confidences(c, 0, [2.0, 2.0, 0.5, 2.0])
    assert out == [WORD, WORD, WORD, EOS]
    rec = c.record(0)
    assert (rec.reason, rec.phase, rec.stop_step) == ("stop", "forcing", 3)
    c.step(torch.zeros(1, V), torch.tensor([0]), torch.tensor([EOS]), torch.tensor([4]))
    assert c.record(0).phase == "done" and c.record(0).thinking_tokens == 3


def test_halting_waits_for_min_think():
    c = ctrl()
    c.add(0, params(min_think=3, halting=halting_params(tau=0.5)))
    out = drive_confidences(c, 0, [3.0, 3.0, 3.0, 3.0, 3.0])
    assert out.index(CONC[0]) == 3


def test_placeholder_tokens_are_not_counted_but_forcing_advances():
    c = ctrl()
    c.add(0, params(think_cap=6))
    # Steps 1 and 2 see a -1 placeholder for the free tokens: not counted, so thinking runs
    # two tokens longer than the cap would otherwise allow.
    out = greedy_run(c, [0], 10, lambda t, i, o: WORD, placeholder=lambda t, r: t in (1, 2))[0]
    assert out[:9] == [WORD] * 5 + list(CONC) + [END]
    c2 = ctrl()
    c2.add(0, params(think_cap=4))
    # Placeholders during forcing: the forced token is certain, so the sequence advances.
    out = greedy_run(c2, [0], 7, lambda t, i, o: WORD, placeholder=lambda t, r: t >= 2)[0]
    assert out[:5] == [WORD, *CONC, END]


def test_no_new_token_keeps_state_idempotent():
    """A row without a new sampled token (chunked prefill) sees the same decision again."""
    c = ctrl()
    c.add(0, params(think_cap=3))
    for _ in range(3):
        lg = prefer(WORD)
        c.step(lg, torch.tensor([0]), torch.tensor([-1]), torch.tensor([0]))
        assert int(lg.argmax()) == CONC[0]
    assert c.record(0).thinking_tokens == 0


def test_slot_reuse_starts_fresh():
    c = ctrl()
    c.add(0, params(think_cap=4, min_think=2, max_extensions=3,
                    halting=halting_params(tau=0.1, aggregate=H.AGG_MIN, window=3)))
    greedy_run(c, [0], 6, lambda t, i, o: END if t == 0 else WORD)
    first = c.remove(0)
    assert first.extensions == 1 and first.reason in ("budget", "halt")
    c.add(0, params())
    rec = c.record(0)
    assert (rec.reason, rec.thinking_tokens, rec.extensions, rec.stop_step) == ("none", 0, 0, None)
    out = greedy_run(c, [0], 5, lambda t, i, o: WORD)[0]
    assert out == [WORD] * 5 and c.record(0).thinking_tokens == 4


def test_rows_subset_and_uncontrolled_rows_untouched():
    c = ctrl()
    c.add(2, params(think_cap=0, conclusion_ids=()))
    lg = torch.randn(3, V)
    before = lg.clone()
    c.step(lg, torch.tensor([2]), torch.tensor([-1]), torch.tensor([0]), rows=torch.tensor([1]))
    assert torch.equal(lg[0], before[0]) and torch.equal(lg[2], before[2])
    assert int(lg[1].argmax()) == END and torch.isinf(lg[1]).sum() == V - 1
    # V2 style: all rows, -1 for rows without a slot
    lg = torch.randn(3, V)
    before = lg.clone()
    c.step(lg, torch.tensor([-1, 2, -1]), torch.tensor([5, -1, 5]), torch.tensor([9, 0, 9]))
    assert torch.equal(lg[0], before[0]) and torch.equal(lg[2], before[2])
    assert int(lg[1].argmax()) == END


def test_inactive_controller_returns_logits_unchanged():
    c = ctrl()
    lg = torch.randn(2, V)
    before = lg.clone()
    assert c.step(lg, torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([1, 1])) is lg
    assert torch.equal(lg, before)


def test_scan_think_state_from_prompts():
    hist = torch.tensor([
        [9, 9, START, 0, 0, 0],          # prompt ends with <think>
        [9, START, 5, 6, 0, 0],          # two thinking tokens already
        [START, 5, END, 6, 0, 0],        # closed
        [9, 9, 9, 9, 9, 9],              # no markers
        [START, END, 5, START, 5, 5],    # reopened, 2 tokens
    ])
    lengths = torch.tensor([3, 4, 4, 6, 6])
    phase, count = C.scan_think_state(hist, lengths, MARKERS)
    T, B = C.PHASE_THINKING, C.PHASE_BEFORE
    assert phase.tolist() == [T, T, B, B, T] and count.tolist() == [0, 2, 0, 0, 2]
    # the host-list version (V1 admission) agrees row by row, and on an empty history
    host = [C.scan_think_ids(row[:n].tolist(), MARKERS) for row, n in zip(hist, lengths.tolist())]
    assert host == list(zip(phase.tolist(), count.tolist()))
    assert C.scan_think_ids([], MARKERS) == (B, 0)


def test_scan_think_ids_matches_the_tensor_scan_on_random_histories():
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        n = int(torch.randint(0, 12, (1,), generator=g))
        ids = torch.randint(0, 4, (n,), generator=g)
        ids = torch.where(ids == 0, START, torch.where(ids == 1, END, ids + 5))
        phase, count = C.scan_think_state(ids[None, :] if n else torch.zeros(1, 1, dtype=torch.long),
                                          torch.tensor([n]), MARKERS)
        assert C.scan_think_ids(ids.tolist(), MARKERS) == (int(phase[0]), int(count[0]))


def test_init_from_history_then_reopen_counts():
    c = ctrl()
    c.add(1, params(phase=C.PHASE_BEFORE, think_cap=10))
    c.init_from_history(torch.tensor([1]), torch.tensor([[9, START, 5, 5, 5]]), torch.tensor([5]),
                        torch.tensor([0]))
    assert c.record(1).phase == "thinking" and c.record(1).thinking_tokens == 3
    out = greedy_run(c, [1], 9, lambda t, i, o: WORD)[0]
    assert thinking_len(out) == 10 - 3 and out[4:7] == list(CONC)


def test_continuation_interrupted_by_budget():
    c = ctrl()
    long_cont = tuple(range(30, 36))
    c.add(0, params(think_cap=8, min_think=8, max_extensions=2, continuation_ids=long_cont))
    out = greedy_run(c, [0], 12, lambda t, i, o: END)[0]
    # count 0: attempt -> 6-token continuation; after 5 of them left = 3 = len(conclusion)
    assert out[:9] == [30, 31, 32, 33, 34, *CONC, END]
    assert thinking_len(out) == 8
    assert c.record(0).reason == "budget"


def test_step_has_no_host_sync(monkeypatch):
    # Eager, so the op logic is checked (the compiler itself reads constants while
    # compiling); with the device top-k: CPU's numpy top-k reads host memory, not a device.
    c = ctrl(backend="eager")
    monkeypatch.setattr(H, "topk_rows", lambda x, k: tuple(x.topk(k, dim=-1)))
    c.add(0, params(think_cap=50, min_think=3, halting=halting_params(tau=1.0, window=4)))
    c.add(1, params(think_cap=2))
    c.add(2, params(halting=C.HaltingParams(H.SIGNAL_SAMPLED, H.AGG_MIN, 20, 1, -2.0, False, True, 0)))

    def boom(*a, **k):
        raise AssertionError("host sync in step")

    logits = torch.randn(2, V)
    args = (torch.tensor([0, 1]), torch.tensor([WORD, WORD]), torch.tensor([1, 1]))
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    c.step(logits, *args)
    c.step(logits, *args, rows=torch.tensor([1, 0]))


@pytest.mark.parametrize("seed", range(6))
def test_random_batches_never_exceed_caps(seed):
    """Random caps, floors, output limits and sampled junk: invariants hold for every row."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n = 6
    c = ctrl(slots=8)
    slots = rng.sample(range(8), n)
    spec = []
    for s in slots:
        cap = rng.choice([None, rng.randint(0, 30)])
        out_limit = rng.choice([None, rng.randint(0, 40)])
        eff = min(x for x in (cap, out_limit, 10 ** 9) if x is not None)
        floor = min(rng.randint(0, 20), eff)
        conc = tuple(rng.choice(range(20, 26)) for _ in range(rng.randint(0, 4)))
        c.add(s, params(think_cap=cap, out_limit=out_limit, min_think=floor, conclusion_ids=conc,
                        max_extensions=rng.randint(0, 3)))
        spec.append((cap, out_limit, floor, len(conc)))
    outs = [[] for _ in slots]
    for _ in range(60):
        lg = torch.randn(n, V, generator=gen) * 2
        lg[:, END] += 1.5                      # the model likes to stop thinking
        lg[:, START] = -math.inf
        last = [o[-1] if o else -1 for o in outs]
        c.step(lg, torch.tensor(slots), torch.tensor(last), torch.tensor([len(o) for o in outs]))
        tok = torch.multinomial(lg.softmax(-1), 1, generator=gen).squeeze(1).tolist()
        for o, t in zip(outs, tok):
            if not (o and o[-1] == EOS):
                o.append(t)
    for (cap, out_limit, floor, conc_len), out in zip(spec, outs):
        think = thinking_len(out)
        if cap is not None:
            assert think <= cap
        ended_early = EOS in out[:think]        # the model may still stop the whole request
        if out_limit is not None and not ended_early:
            assert END in out and out.index(END) <= out_limit
        if END in out and not ended_early:
            assert think >= floor or (cap is not None and cap - conc_len < floor) or (
                out_limit is not None and out_limit - conc_len < floor)


ANS = (25, 26)


def test_answer_prefix_forced_after_conclusion_and_not_counted_as_thinking():
    c = ctrl()
    c.add(0, params(think_cap=7, answer_prefix_ids=ANS))
    out = greedy_run(c, [0], 13, lambda t, i, o: WORD)[0]
    # 4 free + 3 conclusion = 7 thinking tokens, </think>, the answer prefix, then the model
    assert out[:11] == [WORD] * 4 + list(CONC) + [END] + list(ANS) + [WORD]
    rec = c.remove(0)
    assert (rec.reason, rec.thinking_tokens, rec.phase) == ("budget", 7, "answering")


def test_answer_prefix_after_halting_conclusion_but_not_after_a_natural_end():
    c = ctrl()
    halt = C.HaltingParams(H.SIGNAL_TOKEN, H.AGG_TAIL, 5, 2, 0.0, True, False, 3)
    c.add(0, params(halting=halt, answer_prefix_ids=ANS))
    c.add(1, params(answer_prefix_ids=ANS))
    # slot 1's model ends thinking by itself after 2 tokens: no prefix is forced then
    outs = greedy_run(c, [0, 1], 10, lambda t, i, o: END if (i == 1 and t == 2) else WORD)
    k = outs[0].index(END)
    assert outs[0][k - len(CONC):k] == list(CONC) and outs[0][k + 1:k + 3] == list(ANS)
    assert outs[1][:4] == [WORD, WORD, END, WORD]
    assert c.remove(0).reason == "halt" and c.remove(1).reason == "natural"


def test_answer_prefix_with_a_cap_too_small_for_the_conclusion():
    c = ctrl()
    c.add(0, params(think_cap=1, answer_prefix_ids=ANS))
    out = greedy_run(c, [0], 6, lambda t, i, o: WORD)[0]
    # no room for the phrase: </think> at once (forcing starts once left <= len(conclusion)),
    # then the answer prefix, then the model
    assert out[:4] == [END] + list(ANS) + [WORD]
    assert c.remove(0).thinking_tokens == 0


@pytest.mark.parametrize("backend", ["numba", "compile"])
def test_fast_step_matches_eager_step(backend):
    """The numba kernel (the CPU default) and the compiled torch step agree with the eager
    torch step on state and logits (signal values to rounding) over a random mix of
    budgets, halting signals, min-think, placeholders and a row without a slot."""
    rng = random.Random(5)
    pair = [ctrl(8, backend=backend), ctrl(8, backend="eager")]
    assert [c.backend for c in pair] == [backend, "eager"]
    signals = [None, "token_confidence", "entropy", "group_confidence", "sampled_margin"]
    halting_slots, sampled_slots = [], []
    for slot in range(8):
        sig = signals[slot % 5]
        # thresholds inside each signal's range, so some traces halt and some do not
        tau = {"entropy": rng.uniform(-3, -0.5), "sampled_margin": -0.5}.get(sig, rng.uniform(0.5, 3))
        h = (C.HaltingParams(H.signal_code(sig), rng.randrange(3), rng.choice([1, 5, 20]), 3,
                             tau, rng.random() < 0.5, rng.random() < 0.5, 2)
             if sig else None)
        halting_slots += [slot] if sig else []
        sampled_slots += [slot] if sig == "sampled_margin" else []
        p = params(think_cap=rng.choice([None, 3, 9, 20]), min_think=rng.choice([0, 0, 6]),
                   max_extensions=2, halting=h, answer_prefix_ids=(WORD, WORD) if slot % 2 else ())
        for c in pair:
            c.add(slot, p)
    outs = [[] for _ in range(8)]
    slots = torch.tensor([0, 1, 2, 3, -1, 4, 5, 6, 7])
    rows = [r for r in range(len(slots)) if slots[r] >= 0]
    real = slice(0, 8)   # the null slot's bookkeeping is written by the torch step only
    for t in range(40):
        lg = torch.randn(len(slots), V, generator=torch.Generator().manual_seed(t)) * 2
        lg[:, END] += 1.5 if t % 5 == 0 else -1.0
        last = torch.tensor([-1 if s < 0 or not outs[s] or rng.random() < 0.1 else outs[s][-1]
                             for s in slots.tolist()])
        lens = torch.tensor([len(outs[s]) if s >= 0 else 0 for s in slots.tolist()])
        got = [c.step(lg.clone(), slots, last, lens) for c in pair]
        assert torch.equal(got[0], got[1]), t
        assert torch.equal(pair[0].ints[real], pair[1].ints[real]), t
        # signal values may differ in the last bits (other reduction orders); the torch
        # step also writes a value for rows whose slot does not halt, which nothing reads
        torch.testing.assert_close(pair[0].floats[halting_slots], pair[1].floats[halting_slots],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pair[0].top_logprobs[sampled_slots],
                                   pair[1].top_logprobs[sampled_slots], rtol=1e-5, atol=1e-5)
        assert torch.equal(pair[0].top_ids[sampled_slots], pair[1].top_ids[sampled_slots])
        for w in ("v_sum", "v_min", "r_ring", "v_ring"):
            torch.testing.assert_close(getattr(pair[0].windows, w)[real],
                                       getattr(pair[1].windows, w)[real], rtol=1e-5, atol=1e-5)
        for w in ("n", "v_cnt", "v_ok"):
            assert torch.equal(getattr(pair[0].windows, w)[real], getattr(pair[1].windows, w)[real])
        for r in rows:
            outs[slots[r]].append(int(got[0][r].argmax()))
    assert {pair[1].record(s).reason for s in range(8)} >= {"budget", "natural"}
    assert {pair[1].record(s).reason for s in halting_slots} & {"halt", "stop"}


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_sampled_margin_stops_at_an_unlikely_sampled_token(backend):
    """The margin of a token is scored at the next step, from the top-20 kept from the
    logits it was sampled from: the top token costs nothing, an unlikely one stops."""
    c = ctrl(backend=backend)
    c.add(0, params(halting=C.HaltingParams(H.SIGNAL_SAMPLED, H.AGG_MIN, 20, 1, -2.0,
                                            above=False, stop=True, min_tokens=0)))
    out: list[int] = []

    def step(sampled):
        lg = prefer(WORD)
        c.step(lg, torch.tensor([0]), torch.tensor([out[-1] if out else -1]), torch.tensor([len(out)]))
        out.append(sampled)
        return lg

    assert step(WORD).argmax().item() == WORD          # no token yet
    assert step(9).argmax().item() == WORD             # WORD was the top token: margin 0
    forced = step(EOS)                                 # 9 had p ~ e^-5 / (1 + 39 e^-5): margin -5
    assert forced.argmax().item() == EOS and torch.isinf(forced[0, WORD])
    rec = c.remove(0)
    assert (rec.reason, rec.stop_step) == ("stop", 2)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(C, "compiled_advance", lambda: broken)
    c = ctrl(backend="compile")
    c.add(0, params(think_cap=7))
    out = greedy_run(c, [0], 9, lambda t, i, o: WORD)[0]
    assert out[:9] == [WORD] * 4 + list(CONC) + [END] + [WORD]   # as in the eager cap test
    assert c.backend == "eager" and "running it eagerly" in caplog.text


def test_numba_failure_falls_back_to_eager(monkeypatch, caplog):
    from ttc_vllm import control_cpu

    def broken(*args):
        raise RuntimeError("numba typing error")

    monkeypatch.setattr(control_cpu, "step_kernel", broken)
    c = ctrl(backend="numba")
    c.add(0, params(think_cap=7))
    out = greedy_run(c, [0], 9, lambda t, i, o: WORD)[0]
    assert out[:9] == [WORD] * 4 + list(CONC) + [END] + [WORD]
    assert c.backend == "eager" and "running it eagerly" in caplog.text


def test_step_backend_setting(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for value, on_cpu, on_gpu in (("auto", "numba", "eager"), ("eager", "eager", "eager"),
                                  ("compile", "compile", "compile"), ("numba", "numba", "eager")):
        monkeypatch.setenv(C.STEP_ENV, value)
        assert (C.step_backend(cpu), C.step_backend(cuda)) == (on_cpu, on_gpu), value
    monkeypatch.setenv(C.STEP_ENV, "sometimes")
    with pytest.raises(ValueError, match=C.STEP_ENV):
        C.step_backend(cpu)
    with pytest.raises(ValueError, match="backend"):
        ctrl(backend="fast")


def test_kernel_step_falls_back_for_logits_it_cannot_edit():
    """bfloat16 logits (numpy has no bfloat16) take the torch step; same result."""
    pair = [ctrl(backend="numba"), ctrl(backend="eager")]
    for c in pair:
        c.add(0, params(think_cap=3))
    outs = [greedy_run(c, [0], 8, lambda t, i, o: WORD, dtype=torch.bfloat16)[0] for c in pair]
    assert outs[0] == outs[1] and END in outs[0]
    assert pair[0].backend == "numba"


@pytest.mark.parametrize("vocab", [40, 5000])
def test_kernel_vocabulary_passes_match_torch(vocab):
    """The numba step's vectorized inputs: numpy's sort for small vocabularies, torch's
    top-k above `SORT_MAX_VOCAB` (a full sort of 150k logits a row would cost more than
    the rest of the step); both give the descending top-20, log-sum-exp and -H."""
    from ttc_vllm import control_cpu

    x = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    x[0, : vocab // 2] = float("-inf")
    top, lse, neg_ent = control_cpu.vocabulary_passes(x, need_top=True, need_entropy=True)
    assert top.shape == (6, 20) and top.flags.c_contiguous
    torch.testing.assert_close(torch.from_numpy(top), x.topk(20, dim=-1).values)
    torch.testing.assert_close(torch.from_numpy(lse), torch.logsumexp(x, -1))
    torch.testing.assert_close(torch.from_numpy(neg_ent), H.neg_entropy(x))
    c = ctrl(1, backend="numba")
    c.add(0, params(halting=C.HaltingParams(H.SIGNAL_TOKEN, H.AGG_TAIL, 20, 1, 1e6, True, False, 0)))
    c.step(x[:1].clone(), torch.tensor([0]), torch.tensor([-1]), torch.tensor([0]))
    assert c.floats[0, C.F_PENDING].item() == pytest.approx(H.token_confidence(x[:1], 20).item(), rel=1e-5)


@pytest.mark.parametrize("vocab", [1, 7, 40, 272, 4099])
def test_kernel_row_log_sum_exp_and_entropy_match_torch(vocab):
    """The kernel's own log-sum-exp and -H (small vocabularies; its exp is a polynomial in
    SIMD loops) agree with torch's: wide ranges, masked (-inf) logits, lengths that are not
    a multiple of the 8 lanes, logits far above 0; a fully masked row gives -inf, 0."""
    from ttc_vllm import control_cpu

    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g) * torch.tensor([[1.0], [8.0], [40.0], [1e3], [3.0], [1.0]])
    x[4] += 80.0                                       # exp(x) would overflow without the max shift
    if vocab > 1:
        x[5, ::2] = float("-inf")
    e, bits = np.empty(vocab, np.float32), np.empty(vocab, np.int32)
    got = torch.tensor([control_cpu._row_lse(row, True, e, bits) for row in x.numpy()], dtype=torch.float64)
    # against float64 truth: torch's float32 -H (sum p x - lse) itself loses ~1e-5 at x ~ 80
    x64 = x.double()
    lse64 = torch.logsumexp(x64, -1)
    torch.testing.assert_close(got[:, 0], lse64, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(got[:, 1], H.neg_entropy(x64, lse64), rtol=1e-5, atol=1e-5)
    masked = np.full(vocab, -np.inf, np.float32)
    assert control_cpu._row_lse(masked, True, e, bits) == (-np.inf, 0.0)


def test_numba_kernel_is_built_at_construction(monkeypatch, caplog):
    """The kernel is compiled (or loaded from cache) when the engine builds its processor,
    not at the first controlled request; a build failure leaves the eager step."""
    from ttc_vllm import control_cpu

    ctrl(backend="numba")
    assert control_cpu.step_kernel.signatures   # compiled for float32 logits
    monkeypatch.setattr(control_cpu, "warm_up", lambda c: (_ for _ in ()).throw(RuntimeError("no LLVM")))
    c = ctrl(backend="numba")
    assert c.backend == "eager" and "building the numba controller step failed" in caplog.text
    c.add(0, params(think_cap=7))
    assert greedy_run(c, [0], 9, lambda t, i, o: WORD)[0][:9] == [WORD] * 4 + list(CONC) + [END] + [WORD]


@pytest.mark.parametrize("backend", C.BACKENDS)
def test_stop_ids_outside_the_vocabulary_are_ignored(backend):
    """A suppressed id beyond the logits (vLLM rejects such stop_token_ids at admission;
    this is the second line) neither crashes the step nor writes outside the row: the
    numba kernel does not bounds-check by itself."""
    c = ctrl(backend=backend)
    c.add(0, params(min_think=4, max_extensions=0, suppress_ids=(EOS, V + 1000, 10**9)))
    out = greedy_run(c, [0], 6, lambda t, i, o: END)[0]
    assert END not in out[:4] and out[4] == END     # </think> blocked below min_think only


def test_kernel_vocabulary_passes_on_a_row_subset():
    """With `rows`, only those rows are computed, equal to the full passes there; the
    other rows are zeros (the kernel never reads them)."""
    from ttc_vllm import control_cpu

    x = torch.randn(7, V, generator=torch.Generator().manual_seed(3)) * 3
    full = control_cpu.vocabulary_passes(x, need_top=True, need_entropy=True)
    rows = np.array([5, 1, 2], dtype=np.int64)
    part = control_cpu.vocabulary_passes(x, need_top=True, need_entropy=True, rows=rows)
    others = np.array([0, 3, 4, 6])
    for got, want in zip(part, full):
        np.testing.assert_allclose(got[rows], want[rows], rtol=1e-6)
        assert not got[others].any()
    none = control_cpu.vocabulary_passes(x, need_top=False, need_entropy=False, rows=rows[:0])
    assert none[0].shape == (7, 0) and not none[1].any()


def test_signal_rows_drop_answering_and_done_rows_but_keep_reopening_ones():
    """The numba step runs the vocabulary passes only on halting rows that may think
    after this step. Rows that answer or are done drop out; a row reopening thinking with
    `<think>`, and a row being forced a continuation back into thinking, stay in -- and
    their signals then match the eager torch step."""
    from ttc_vllm import control_cpu

    pair = [ctrl(4, backend="numba"), ctrl(4, backend="eager")]
    h = halting_params(tau=1e6)
    for c in pair:
        c.add(0, params(halting=h))                                # thinking
        c.add(1, params(halting=h, phase=C.PHASE_ANSWERING))       # answering; reopens below
        c.add(2, params(halting=h, phase=C.PHASE_ANSWERING))       # answering, stays
        c.add(3, params(halting=h, min_think=5, max_extensions=2))  # will be forced "Wait"
    slots = torch.tensor([0, 1, 2, 3])
    outs = [[WORD], [WORD], [WORD], [WORD]]
    views = pair[0]._views or control_cpu.state_views(pair[0])
    for t in range(6):
        last = torch.tensor([o[-1] for o in outs])
        need = control_cpu.needs_signal(views[0], np.arange(4), slots.numpy(), last.numpy(), START)
        if t == 1:
            assert set(need.tolist()) == {0, 1, 3}
        assert 2 not in need.tolist()
        lg = torch.randn(4, V, generator=torch.Generator().manual_seed(t))
        lg[3, END] = 9.0                                             # slot 3 keeps trying to end
        got = [c.step(lg.clone(), slots, last, torch.tensor([len(o) for o in outs])) for c in pair]
        assert torch.equal(got[0], got[1])
        assert torch.equal(pair[0].ints[:4], pair[1].ints[:4])
        torch.testing.assert_close(pair[0].floats[:4], pair[1].floats[:4], rtol=1e-5, atol=1e-5)
        views = pair[0]._views
        for i in range(4):
            outs[i].append(START if (i == 1 and t == 0) else int(got[0][i].argmax()))
    assert pair[1].record(1).phase == "thinking" and pair[1].record(2).phase == "answering"
    assert pair[1].record(3).extensions >= 1
    # the reopened row's last pending signal is its last logits' confidence, not zero
    assert pair[0].floats[1, C.F_PENDING].item() > 0


@pytest.mark.parametrize("backend", ["eager", "numba"])
def test_values_past_int64_are_clamped_not_raised(backend):
    """Defence in depth behind the option bounds: parameters the int64 state cannot hold
    (10**30 caps, a float threshold past float32) are clamped at admission; the request
    still thinks freely under a cap that large, and halting with an unreachable threshold
    never fires."""
    c = ctrl(backend=backend)
    huge = 10 ** 30
    halting = C.HaltingParams(H.signal_code("token_confidence"), H.aggregate_code("tail"), 20, 4,
                              1e300, True, False, huge)
    c.add(0, params(think_cap=huge, out_limit=2 ** 63, min_think=huge, max_extensions=huge,
                    thinking_tokens=huge, halting=halting))
    assert int(c.ints[0].max()) <= C.UNLIMITED and math.isfinite(float(c.floats[0, C.F_TAU]))
    c.add(1, params(think_cap=huge))
    out = greedy_run(c, [1], 20, lambda t, i, o: WORD)[0]
    assert out == [WORD] * 20
