"""Testbed PRM trainer: AUC, regrouping label rows, the loss, the split, the saved format."""
import json
import math

import pytest
import torch

from ttc_vllm.prm.scorers import token_ids_input
from ttc_vllm.testbed.train_prm import (
    collate, evaluate, held_out, roc_auc, soft_step_loss, traces_from_rows,
)


def test_roc_auc_hand_computed():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([1, 2, 3], [0, 1, 1]) == 1.0
    assert roc_auc([3, 2, 1], [0, 1, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # ties count half
    assert roc_auc([0.2, 0.5, 0.5], [0, 1, 0]) == pytest.approx(0.75)
    assert roc_auc([0.1, 0.2], [1, 1]) is None


def test_soft_step_loss():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3)]])
    # targets 1 and 0.25: -(log .5) and -(.25 log .75 + .75 log .25)
    want = (math.log(2) - (0.25 * math.log(0.75) + 0.75 * math.log(0.25))) / 2
    assert soft_step_loss(logits, torch.tensor([1.0, 0.25])).item() == pytest.approx(want)


def rows_of(trace_id, steps, mc, exact, problem=(1, 2)):
    prompt = [1, 50, 51]
    return [{"trace_id": trace_id, "step_index": k, "prompt_token_ids": prompt,
             "step_token_ids": steps[: k + 1], "step_text": f"s{k}", "final": k == len(steps) - 1,
             "mc_value": mc[k], "exact_prefix_correct": exact[k],
             "problem": {"terms": list(problem)}} for k in range(len(steps))]


def test_traces_from_rows_regroups_in_step_order():
    rows = rows_of(7, [[60, 5], [61, 5], [62, 2]], [0.5, 0.25, 0.0], [True, False, False])
    rows += rows_of(3, [[70, 5]], [1.0], [True], problem=(3, 4))
    data = traces_from_rows(list(reversed(rows)))
    assert [len(d.trace.steps) for d in data] == [1, 3]  # sorted by trace id
    d = data[1]
    assert d.trace.token_ids == (1, 50, 51, 60, 5, 61, 5, 62, 2)
    assert d.mc_values == [0.5, 0.25, 0.0] and d.exact == [True, False, False]
    assert [s.finished for s in d.trace.steps] == [False, False, True]
    x = token_ids_input(d.trace, tag_id=5, eos_id=2)  # final EOS replaced by the tag
    assert x.token_ids[-1] == 5 and x.step_positions == [4, 6, 8]
    ids, mask, r, c = collate([x, token_ids_input(data[0].trace, 5, 2)], pad_id=0)
    assert ids.shape == (2, 9) and mask[1].tolist() == [1] * 5 + [0] * 4
    assert r.tolist() == [0, 0, 0, 1] and c.tolist() == [4, 6, 8, 4]
    with pytest.raises(ValueError, match="step rows"):
        traces_from_rows(rows[:1] + rows[2:3])


def test_evaluate_uses_exact_and_mc_labels():
    data = traces_from_rows(rows_of(0, [[60, 5], [61, 5], [62, 2]], [0.9, 0.4, 0.0],
                                    [True, True, False]))
    m = evaluate([[0.8, 0.6, 0.1]], data)
    assert m["auc_exact"] == 1.0 and m["auc_mc"] == 1.0 and m["positives_exact"] == 2
    m = evaluate([[0.8, 0.05, 0.1]], data)
    assert m["auc_exact"] == 0.5 and m["auc_mc"] == 1.0


def test_held_out_is_a_stable_problem_split():
    keys = [json.dumps({"terms": [i, i + 1]}) for i in range(2000)]
    share = sum(held_out(k, 0.15, 0) for k in keys) / len(keys)
    assert 0.12 < share < 0.18
    assert [held_out(k, 0.15, 0) for k in keys[:50]] == [held_out(k, 0.15, 0) for k in keys[:50]]


def test_surprise_targets_running_min_over_the_completion():
    from ttc_vllm.testbed.train_prm import completion_mask, surprise_targets

    # vocab 3; policy probs per position predict the NEXT token
    probs = torch.tensor([[[0.8, 0.1, 0.1],    # -> token at 1 is 0: r = 1
                           [0.1, 0.8, 0.1],    # -> token at 2 is 2: r = 0.1 / 0.8
                           [0.5, 0.5, 0.0],    # -> token at 3 is 1 (tag): ignored
                           [0.4, 0.2, 0.4],    # -> token at 4 is 0: r = 1
                           [1.0, 0.0, 0.0]]])
    ids = torch.tensor([[0, 0, 2, 1, 0]])
    comp = completion_mask([5], [1], 5)
    assert comp.tolist() == [[False, True, True, True, True]]
    got = surprise_targets(probs.clamp_min(1e-9).log(), ids, tag_id=1, completion_mask=comp, floor=0.25)
    r2 = (0.1 / 0.8) / 0.25
    assert got[0].tolist() == pytest.approx([1.0, 1.0, r2, r2, r2])


def test_extra_layers_start_as_the_policy_and_teacher_is_the_policy():
    from transformers import AutoModelForCausalLM

    from ttc_vllm.testbed import policy_path
    from ttc_vllm.testbed.train_prm import build_model

    if not (policy_path() / "model.safetensors").exists():
        pytest.skip("no shipped policy")
    model, config, teacher = build_model(policy_path(), extra_layers=2)
    assert config.num_hidden_layers == 6 and len(config.layer_types) == 6
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "model.layers.3.mlp.up_proj.weight" in frozen and "model.embed_tokens.weight" in frozen
    assert "model.layers.4.mlp.up_proj.weight" not in frozen and "model.norm.weight" not in frozen
    policy = AutoModelForCausalLM.from_pretrained(str(policy_path()), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 60, 61, 62, 70, 71]])
    with torch.no_grad():
        _, base = model(ids, return_base=True)
        want = torch.log_softmax(policy(ids).logits, -1)
        hidden = model.model(input_ids=ids).last_hidden_state
        policy_hidden = policy.model(input_ids=ids).last_hidden_state
    assert torch.allclose(teacher(base), want, atol=1e-4)
    assert torch.allclose(hidden, policy_hidden, atol=1e-5)  # new layers start as identity


def test_step_targets_hard_and_soft():
    from ttc_vllm.testbed.train_prm import step_targets

    assert step_targets([0.0, 0.2, 1.0], "soft") == [0.0, 0.2, 1.0]
    assert step_targets([0.0, 0.2, 1.0], "hard") == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="label"):
        step_targets([0.5], "fuzzy")


def test_validation_auc_scores_against_the_training_targets():
    from ttc_vllm.testbed.train_prm import LabelledTrace, validation_auc
    from ttc_vllm.search.protocols import Trace

    data = [LabelledTrace(Trace((1,)), [0.0, 0.4], [True, True], "a"),
            LabelledTrace(Trace((1,)), [1.0, 0.0], [True, False], "b")]
    # hard targets: [0, 1], [1, 0]; scores ranking every target-1 step above every 0 step
    assert validation_auc([[0.1, 0.8], [0.9, 0.2]], data, "hard") == 1.0
    # soft targets > 0.5: only step 0 of trace b is positive
    assert validation_auc([[0.1, 0.8], [0.9, 0.2]], data, "soft") == 1.0
    assert validation_auc([[0.9, 0.8], [0.1, 0.2]], data, "soft") == 0.0


@pytest.mark.parametrize("floor", ["0", "1.5", "-0.2"])
def test_surprise_floor_out_of_range_is_refused(floor, tmp_path, capsys):
    from ttc_vllm.testbed.train_prm import main

    with pytest.raises(SystemExit):
        main(["--labels", str(tmp_path / "x.jsonl"), "--policy", str(tmp_path), "--out",
              str(tmp_path / "o"), "--surprise-floor", floor])
    assert "--surprise-floor must be in (0, 1]" in capsys.readouterr().err
