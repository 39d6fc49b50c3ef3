import json
import math
from types import SimpleNamespace

import pytest

from ttc_vllm import calibrate as cal
from ttc_vllm import halting as H
from ttc_vllm.options import TTCOptions


def test_entry_by_percentile_uses_engine_maths():
    # tail over window 2 of r: trace scores (max, min_tokens=2) are 2.5, 4.0, 1.5
    traces = [[1.0, 3.0, 2.0], [0.0, 4.0, 4.0], [1.0, 2.0, 1.0]]
    e = cal.calibrate_entry(traces, signal="token_confidence", aggregate="tail", window=2,
                            min_tokens=2, percentile=50)
    assert e["threshold"] == pytest.approx(2.5)
    assert (e["signal"], e["aggregate"], e["window"], e["min_tokens"], e["traces"]) == (
        "token_confidence", "tail", 2, 2, 3)


def test_entry_by_accuracy_loss_and_argument_checks():
    traces = [[1.0], [2.0], [3.0], [4.0]]
    e = cal.calibrate_entry(traces, signal="token_confidence", aggregate="mean", window=1,
                            direction="below", max_loss=0.0, correct=[False, False, True, True])
    assert e["threshold"] == 3.0 and e["accuracy"] == 0.5
    with pytest.raises(ValueError, match="exactly one"):
        cal.calibrate_entry(traces, signal="entropy", aggregate="mean", window=1)
    with pytest.raises(ValueError, match="correctness"):
        cal.calibrate_entry(traces, signal="entropy", aggregate="mean", window=1, max_loss=0.1)


def test_confidence_threshold_is_clamped_into_range():
    e = cal.calibrate_entry([[0.0], [0.0], [1.0]], signal="token_confidence", aggregate="mean", window=1,
                            max_loss=1.0, correct=[True, True, True])
    assert e["threshold"] == 0.0
    # "below" acting on every trace puts tau just above the largest score: 0 for a margin
    e = cal.calibrate_entry([[0.0], [-1.0]], signal="sampled_margin", aggregate="min", window=1,
                            direction="below", max_loss=1.0, correct=[False, False])
    assert e["threshold"] == 0.0
    TTCOptions.model_validate({"halting": {k: e[k] for k in ("signal", "aggregate", "threshold", "direction")}})


def test_save_load_roundtrip_and_errors(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    cal.save_calibration(path, "a", {"signal": "entropy", "threshold": -1.0})
    cal.save_calibration(path, "b", {"signal": "token_confidence", "threshold": 2.0})
    assert set(cal.load_calibration(path)) == {"a", "b"}
    monkeypatch.delenv(cal.CALIBRATION_ENV, raising=False)
    assert cal.load_calibration() == {}
    monkeypatch.setenv(cal.CALIBRATION_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="does not exist"):
        cal.load_calibration()
    path.write_text(json.dumps({"x": {"signal": "entropy"}}))
    with pytest.raises(ValueError, match="'x' has no numeric threshold"):
        cal.load_calibration(path)


def test_replay_signal_from_vllm_logprobs():
    lp = lambda v, r: SimpleNamespace(logprob=v, rank=r)  # noqa: E731
    # sampled token (rank 3) returned beside the top-2
    pos = {5: lp(math.log(0.5), 1), 6: lp(math.log(0.25), 2), 7: lp(math.log(0.125), 3)}
    assert H.replay_signal([pos], "token_confidence", 2) == pytest.approx([(math.log(2) + math.log(4)) / 2])
    full = {i: lp(math.log(0.25), i + 1) for i in range(4)}
    assert H.replay_signal([full], "entropy", 20) == pytest.approx([-math.log(4)])
    # sampled_margin: the sampled token's log-prob minus the top one, clipped at the 20th
    top20 = {i: lp(-1.0 - 0.1 * i, i + 1) for i in range(20)}
    beyond = {**top20, 99: lp(-9.0, 57)}
    got = H.replay_signal([pos, top20, beyond], "sampled_margin", 20, token_ids=[7, 3, 99])
    assert got == pytest.approx([math.log(0.125) - math.log(0.5), -0.3, -1.9])
    with pytest.raises(ValueError, match="token ids"):
        H.replay_signal([pos], "sampled_margin", 20)


def test_parser_requires_one_picking_rule():
    with pytest.raises(SystemExit):
        cal.build_parser().parse_args(["--name", "x"])
    args = cal.build_parser().parse_args(["--name", "x", "--percentile", "10", "--direction", "below"])
    assert args.percentile == 10 and args.seed == cal.CALIBRATION_SEED
