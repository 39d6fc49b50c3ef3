import json

import pytest
from pydantic import ValidationError

from ttc_vllm.calibrate import save_calibration
from ttc_vllm.options import DEFAULT_CONCLUSION, HaltingOptions, TTCOptions


def test_defaults_and_roundtrip_through_extra_args():
    opts = TTCOptions(max_think=100, min_think=10, halting={"signal": "entropy", "threshold": -0.5})
    xargs = opts.to_extra_args()
    assert list(xargs) == ["ttc"] and isinstance(xargs["ttc"], str)   # flat: valid vllm_xargs
    back = TTCOptions.from_extra_args(xargs)
    assert back == opts
    assert back.conclusion == DEFAULT_CONCLUSION and back.answer_reserve == 16
    # defaults are not serialised
    assert "answer_reserve" not in json.loads(xargs["ttc"])


def test_from_extra_args_accepts_dict_and_json_and_absence():
    assert TTCOptions.from_extra_args(None) is None
    assert TTCOptions.from_extra_args({"other": 1}) is None
    assert TTCOptions.from_extra_args({"ttc": None}) is None
    assert TTCOptions.from_extra_args({"ttc": {"max_think": 5}}).max_think == 5
    assert TTCOptions.from_extra_args({"ttc": '{"max_think": 7}'}).max_think == 7


@pytest.mark.parametrize("payload, field", [
    ({"max_think": -1}, "ttc.max_think"),
    ({"min_think": -3}, "ttc.min_think"),
    ({"answer_reserve": -1}, "ttc.answer_reserve"),
    ({"max_extensions": -1}, "ttc.max_extensions"),
    ({"reasoning_effort": "extreme"}, "ttc.reasoning_effort"),
    ({"bogus": 1}, "ttc.bogus"),
    ({"halting": {"threshold": 1, "junk": {"nested": True}}}, "ttc.halting.junk"),
    ({"halting": {"threshold": 1, "top_k": 21}}, "ttc.halting.top_k"),
    ({"halting": {"threshold": 1, "top_k": 0}}, "ttc.halting.top_k"),
    ({"halting": {"threshold": 1, "window": 0}}, "ttc.halting.window"),
    ({"halting": {"threshold": 1, "signal": "vibes"}}, "ttc.halting.signal"),
    ({"halting": {"threshold": 1, "aggregate": "median"}}, "ttc.halting.aggregate"),
    ({"halting": {"threshold": 1, "action": "explode"}}, "ttc.halting.action"),
    ({"halting": {"threshold": 1, "min_tokens": -1}}, "ttc.halting.min_tokens"),
    ({"halting": {"threshold": float("nan")}}, "ttc.halting.threshold"),
    ({"halting": {"threshold": float("inf")}}, "ttc.halting.threshold"),
    ({"halting": {"threshold": True}}, "ttc.halting.threshold"),
    ({"halting": {"threshold": [1]}}, "ttc.halting.threshold"),
    ({"halting": {"threshold": ""}}, "ttc.halting.threshold"),
    ({"halting": {}}, "ttc.halting.threshold"),
])
def test_bad_fields_are_named(payload, field):
    with pytest.raises(ValueError) as e:
        TTCOptions.from_extra_args({"ttc": payload})
    assert field in str(e.value)


def test_bad_json_and_wrong_type_name_ttc():
    with pytest.raises(ValueError, match=r"^ttc: not valid JSON"):
        TTCOptions.from_extra_args({"ttc": "{max_think: 3"})
    with pytest.raises(ValueError, match=r"^ttc: expected an object"):
        TTCOptions.from_extra_args({"ttc": "[1, 2]"})


def test_min_above_max_names_both():
    with pytest.raises(ValidationError) as e:
        TTCOptions(max_think=10, min_think=11)
    assert "min_think" in str(e.value) and "max_think" in str(e.value)
    TTCOptions(max_think=10, min_think=10)  # equal is fine


def test_budget_tokens_aliases_map_to_max_think():
    assert TTCOptions(budget_tokens=300).max_think == 300
    assert TTCOptions.model_validate({"thinking_budget": 200}).max_think == 200
    assert TTCOptions(max_think=5, budget_tokens=5).max_think == 5
    with pytest.raises(ValidationError, match="max_think.*budget_tokens"):
        TTCOptions(max_think=5, budget_tokens=6)
    with pytest.raises(ValidationError, match="min_think"):
        TTCOptions(budget_tokens=5, min_think=9)
    # round trip keeps a single source of truth
    assert TTCOptions.from_extra_args(TTCOptions(budget_tokens=42).to_extra_args()).max_think == 42


def test_threshold_range_depends_on_signal():
    with pytest.raises(ValidationError, match="negative threshold"):
        HaltingOptions(signal="token_confidence", threshold=-0.1)
    with pytest.raises(ValidationError, match="negative threshold"):
        HaltingOptions(signal="group_confidence", threshold=-1)
    with pytest.raises(ValidationError, match="positive threshold"):
        HaltingOptions(signal="entropy", threshold=0.3)
    assert HaltingOptions(signal="entropy", threshold=-0.3).threshold == -0.3
    assert HaltingOptions(signal="token_confidence", threshold=0).threshold == 0.0
    assert HaltingOptions(threshold="2.5").threshold == 2.5        # numeric string is a number
    assert HaltingOptions(threshold="easy-90").is_calibrated


def test_resolved_think_uses_effort_table_reserve_and_clips_min():
    tables = {"default": {"none": 0, "low": 10, "medium": 50, "high": 200}}
    assert TTCOptions(reasoning_effort="medium").resolved_think(None, tables=tables) == (50, 0)
    # explicit max_think wins over effort
    assert TTCOptions(reasoning_effort="high", max_think=7).resolved_think(None, tables=tables) == (7, 0)
    # the answer reserve takes max_tokens - reserve - 1 (the </think> marker)
    assert TTCOptions(max_think=500, answer_reserve=20).resolved_think(100, tables=tables) == (79, 0)
    # min_think is clipped to what the budget leaves
    assert TTCOptions(min_think=90, answer_reserve=20).resolved_think(100, tables=tables) == (79, 79)
    assert TTCOptions(reasoning_effort="none", min_think=5).resolved_think(None, tables=tables) == (0, 0)
    assert TTCOptions().resolved_think(None) == (None, 0)


def test_named_threshold_resolves_through_calibration_file(tmp_path, monkeypatch):
    path = tmp_path / "cal.json"
    save_calibration(path, "medium-p80", {"signal": "group_confidence", "aggregate": "min",
                                          "window": 8, "threshold": 1.25, "percentile": 80})
    monkeypatch.setenv("TTC_VLLM_CALIBRATION", str(path))
    opts = TTCOptions(halting={"threshold": "medium-p80", "action": "stop"})
    h = opts.resolved_halting()
    assert (h.signal, h.aggregate, h.window, h.threshold, h.action) == ("group_confidence", "min", 8, 1.25, "stop")
    with pytest.raises(ValueError, match="no calibration entry 'other'"):
        TTCOptions(halting={"threshold": "other"}).resolved_halting()
    with pytest.raises(ValueError, match="halting.window"):
        TTCOptions(halting={"threshold": "medium-p80", "window": 4}).resolved_halting()
    # numeric thresholds need no file
    assert TTCOptions(halting={"threshold": 3}).resolved_halting().threshold == 3.0


def test_search_is_validated_by_the_search_options_model():
    opts = TTCOptions(search={"strategy": "best_of_n", "n": 4})
    assert opts.search.strategy == "best_of_n" and opts.search.n == 4
    with pytest.raises(ValueError, match=r"search\.n"):
        TTCOptions(search={"strategy": "best_of_n", "n": 0})
    with pytest.raises(ValueError, match=r"search\.strategy"):
        TTCOptions(search={"strategy": "telepathy"})
