import math
import random

import pytest
import torch

from ttc_vllm import halting as H

P = torch.tensor([0.5, 0.25, 0.125, 0.125])


def test_token_confidence_hand_computed():
    logits = P.log()[None, :] + 3.0          # a shift changes nothing
    # top-2: -(ln .5 + ln .25)/2
    assert H.token_confidence(logits, 2).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    # top-4 (all): -(ln .5 + ln .25 + 2 ln .125)/4
    assert H.token_confidence(logits, 20).item() == pytest.approx((math.log(2) + math.log(4) + 2 * math.log(8)) / 4)
    # per-row k
    two = torch.cat([logits, logits])
    got = H.token_confidence(two, torch.tensor([1, 3]))
    assert got.tolist() == pytest.approx([math.log(2), (math.log(2) + math.log(4) + math.log(8)) / 3])


def test_token_confidence_skips_masked_tokens():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    assert H.token_confidence(logits, 4).item() == pytest.approx(math.log(2))


def test_neg_entropy_hand_computed_and_signed():
    logits = P.log()[None, :]
    expected = sum(p * math.log(p) for p in P.tolist())           # -1.75 bits = -1.2130 nats
    assert H.neg_entropy(logits).item() == pytest.approx(expected)
    assert expected == pytest.approx(-1.75 * math.log(2))
    one_hot = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    assert H.neg_entropy(one_hot).item() == 0.0                     # most confident = largest
    uniform = torch.zeros(1, 8)
    assert H.neg_entropy(uniform).item() == pytest.approx(-math.log(8))


def test_raw_signal_picks_per_row():
    logits = P.log().repeat(3, 1)
    sig = torch.tensor([H.SIGNAL_TOKEN, H.SIGNAL_ENTROPY, H.SIGNAL_SAMPLED])
    got, ids, lp = H.raw_signal(logits, sig, torch.tensor([2, 2, 2]))
    assert got.tolist() == pytest.approx([(math.log(2) + math.log(4)) / 2, -1.75 * math.log(2), 0.0])
    assert ids is None and lp is None
    _, ids, lp = H.raw_signal(logits, sig, torch.tensor([2, 2, 2]), need_top=True)
    assert ids[0, :2].tolist() == [0, 1] and lp[0, :2].tolist() == pytest.approx([-math.log(2), -math.log(4)])


def test_sampled_margin_hand_computed():
    # top-3 of a row: ids 5, 2, 9 with log-probs -0.1, -2.0, -3.0
    ids = torch.tensor([[5, 2, 9]] * 3)
    lp = torch.tensor([[-0.1, -2.0, -3.0]] * 3)
    got = H.sampled_margin(ids, lp, torch.tensor([5, 2, 7]))
    # the top token: 0; the second: -1.9; outside the top-3: clipped at the 3rd, -2.9
    assert got.tolist() == pytest.approx([0.0, -1.9, -2.9])


def test_aggregate_series_hand_computed():
    r = [1.0, 3.0, 2.0, 6.0]
    assert H.aggregate_series(r, "token_confidence", "mean", 2) == pytest.approx([1, 2, 2, 3])
    assert H.aggregate_series(r, "token_confidence", "min", 2) == pytest.approx([1, 1, 1, 1])
    assert H.aggregate_series(r, "token_confidence", "tail", 2) == pytest.approx([1, 2, 2.5, 4])
    # group confidence G = [-, 2, 2.5, 4] (full windows only)
    g_mean = H.aggregate_series(r, "group_confidence", "mean", 2)
    assert math.isnan(g_mean[0]) and g_mean[1:] == pytest.approx([2, 2.25, 8.5 / 3])
    assert H.aggregate_series(r, "group_confidence", "min", 2)[1:] == pytest.approx([2, 2, 2])
    assert H.aggregate_series(r, "group_confidence", "tail", 2)[1:] == pytest.approx([2, 2.25, 3.25])


def test_trace_score_respects_min_tokens_and_direction():
    f = [math.nan, 2.0, 2.25, 8.5 / 3]
    assert H.trace_score(f, 3, "above") == pytest.approx(8.5 / 3)
    assert H.trace_score(f, 3, "below") == pytest.approx(2.25)
    assert H.trace_score(f, 0, "below") == pytest.approx(2.0)
    assert math.isnan(H.trace_score(f, 5))


def test_halt_rule_strict_and_directional():
    f = torch.tensor([1.0, 2.0, 3.0, 3.0])
    valid = torch.tensor([True, True, True, False])
    tau = torch.tensor([2.0, 2.0, 2.0, 2.0])
    above = torch.tensor([True, True, False, True])
    assert H.halt_decision(f, valid, tau, above).tolist() == [False, False, False, False]
    assert H.halt_decision(f, valid, tau, ~above).tolist() == [True, False, True, False]
    assert H.halt_decision(f + 0.5, valid, tau, above).tolist() == [False, True, False, False]


@pytest.mark.parametrize("signal", ["token_confidence", "group_confidence", "entropy"])
@pytest.mark.parametrize("aggregate", ["mean", "min", "tail"])
def test_ring_buffers_match_reference(signal, aggregate):
    """Online per-slot ring buffers (interleaved slots, masked rows) == offline reference."""
    rng = random.Random(hash((signal, aggregate)) % 1000)
    windows = {0: 3, 1: 1, 2: 5}
    sw = H.SignalWindows(num_slots=4, window=2)
    for slot, w in windows.items():
        sw.reset(slot, H.signal_code(signal), H.aggregate_code(aggregate), w)
    series = {s: [] for s in windows}
    slots = torch.tensor([2, 0, 1, 3])          # slot 3 is never pushed
    for _ in range(12):
        r = torch.tensor([rng.uniform(0, 4) for _ in range(4)])
        mask = torch.tensor([rng.random() < 0.7, rng.random() < 0.7, True, False])
        sw.push(slots, r, mask)
        for row, s in enumerate(slots.tolist()):
            if mask[row]:
                series[s].append(r[row].item())
        f, valid = sw.value(slots)
        for row, s in enumerate(slots.tolist()):
            if s not in windows:
                assert not valid[row]
                continue
            ref = H.aggregate_series(series[s], signal, aggregate, windows[s])
            if not ref or math.isnan(ref[-1]):
                assert not valid[row]
            else:
                assert valid[row] and f[row].item() == pytest.approx(ref[-1], rel=1e-5, abs=1e-5)


def test_reset_clears_a_reused_slot():
    sw = H.SignalWindows(2, 4)
    sw.reset(0, H.SIGNAL_TOKEN, H.AGG_MIN, 4)
    sw.push(torch.tensor([0]), torch.tensor([0.1]), torch.tensor([True]))
    sw.reset(0, H.SIGNAL_TOKEN, H.AGG_MIN, 4)
    assert not sw.value(torch.tensor([0]))[1].item()
    sw.push(torch.tensor([0]), torch.tensor([5.0]), torch.tensor([True]))
    assert sw.value(torch.tensor([0]))[0].item() == 5.0


def test_capacity_grows_and_keeps_existing_slots():
    sw = H.SignalWindows(2, 2)
    sw.reset(0, H.SIGNAL_TOKEN, H.AGG_TAIL, 2)
    for x in (1.0, 2.0, 4.0):
        sw.push(torch.tensor([0]), torch.tensor([x]), torch.tensor([True]))
    sw.reset(1, H.SIGNAL_TOKEN, H.AGG_TAIL, 6)       # grows the rings
    assert sw.capacity == 6
    assert sw.value(torch.tensor([0]))[0].item() == pytest.approx(3.0)


def test_threshold_by_percentile():
    assert H.threshold_by_percentile([5, 1, 4, 2, 3], 50) == 3
    assert H.threshold_by_percentile([5, 1, 4, 2, 3], 25) == 2
    assert H.threshold_by_percentile([5, 1, 4, 2, 3, math.nan], 90) == pytest.approx(4.6)
    with pytest.raises(ValueError):
        H.threshold_by_percentile([math.nan], 50)
    with pytest.raises(ValueError):
        H.threshold_by_percentile([1.0], 101)


def test_threshold_by_accuracy_loss_above():
    scores, correct = [1.0, 2.0, 3.0, 4.0], [False, True, False, True]
    # tau=1 acts on {2,3,4}: one wrong -> loss .25; acting on all costs .5
    assert H.threshold_by_accuracy_loss(scores, correct, 0.25, "above") == 1.0
    assert H.threshold_by_accuracy_loss(scores, correct, 0.0, "above") == 3.0
    assert H.threshold_by_accuracy_loss(scores, correct, 0.5, "above") < 1.0


def test_threshold_by_accuracy_loss_below():
    scores, correct = [1.0, 2.0, 3.0, 4.0, math.nan], [False, False, True, True, True]
    # stopping {1,2} loses nothing; also stopping 3 loses one correct trace of 5
    assert H.threshold_by_accuracy_loss(scores, correct, 0.0, "below") == 3.0
    assert H.threshold_by_accuracy_loss(scores, correct, 0.2, "below") == 4.0
    with pytest.raises(ValueError):
        H.threshold_by_accuracy_loss(scores, correct[:2], 0.1)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_values_matches_torch_topk(k):
    x = torch.randn(7, 40)
    x[0, 3:] = float("-inf")          # fewer allowed tokens than k
    x[1, :12] = 2.5                   # ties
    assert torch.equal(H.top_values(x.bfloat16(), k), x.bfloat16().topk(k, dim=-1).values)
    assert torch.equal(H.top_values(x, k), x.topk(k, dim=-1).values)
    compiled = torch.compile(lambda t: H.top_values(t, k) * 2, dynamic=True)
    assert torch.equal(compiled(x), x.topk(k, dim=-1).values * 2)


def test_write_row_on_cpu_goes_through_the_shared_memory_and_elsewhere_keeps_shape():
    import numpy as np

    t = torch.zeros(3, 4, dtype=torch.long)
    H.write_row(t, 1, np.arange(4, dtype=np.int64))
    H.write_row(t, (2, 3), 7)
    assert t.tolist() == [[0, 0, 0, 0], [0, 1, 2, 3], [0, 0, 0, 7]]
    # the non-CPU branches (a GPU engine's admission), on the meta device
    m = torch.zeros(3, 4, dtype=torch.long, device="meta")
    H.write_row(m, 1, np.arange(4, dtype=np.int64))
    H.write_row(m, (2, 3), 7)
    f = torch.zeros(3, dtype=torch.float32, device="meta")
    H.write_row(f, 0, math.inf)
    assert m.shape == (3, 4) and m.dtype == torch.long and f.dtype == torch.float32
