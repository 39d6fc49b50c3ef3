"""Start-up PRM configuration of the server, and the HTTP pooling-server scorer over a fake
PRM server (httpx MockTransport)."""
from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from ttc_vllm.search.protocols import Step, Trace
from ttc_vllm.testbed import prm_scorer_config
from ttc_vllm.testbed.oracle_prm import OraclePRM
from ttc_vllm_plugins.prm_config import PRMConfigError, prm_config, scorer_from_env
from ttc_vllm_plugins.prm_http import HTTPPoolingPRM

TAG, EOS = 7, 1


def test_no_prm_configured():
    assert scorer_from_env({}) is None
    assert scorer_from_env({"TTC_VLLM_PRM": "  "}) is None


def test_python_factory_scorer():
    scorer = scorer_from_env({"TTC_VLLM_PRM": "python:ttc_vllm.testbed.oracle_prm:OraclePRM"})
    assert isinstance(scorer, OraclePRM)


@pytest.mark.parametrize("spec,match", [
    ("python:nomodule", "expected python:package.module:factory"),
    ("python:no.such.module:f", "cannot import"),
    ("python:json:dumps", "failed: TypeError"),
    ("python:builtins:object", "no score"),
])
def test_bad_python_factories_fail_at_start_up(spec, match):
    with pytest.raises(PRMConfigError, match=match):
        scorer_from_env({"TTC_VLLM_PRM": spec})


def test_prm_config_defaults_to_the_testbed_and_validates_json(tmp_path):
    assert prm_config("").model == prm_scorer_config().model
    path = tmp_path / "prm.json"
    path.write_text(json.dumps({"kind": "pooling", "model": "/models/prm", "step_tag": "<extra_0>"}))
    assert prm_config(str(path)).step_tag == "<extra_0>"
    with pytest.raises(PRMConfigError, match="TTC_VLLM_PRM_CONFIG"):
        prm_config('{"kind": "pooling"}')


def test_http_scorer_refuses_chat_format_prms():
    with pytest.raises(PRMConfigError, match="token_ids"):
        scorer_from_env({"TTC_VLLM_PRM": "http://127.0.0.1:9", "TTC_VLLM_PRM_CONFIG":
                         json.dumps({"kind": "pooling", "model": "m", "input_format": "chat"})})


class Tok:
    eos_token_id = EOS

    def encode(self, text, add_special_tokens=False):
        return [TAG] if text == "<step>" else [ord(c) for c in text]


def test_http_scorer_maps_pooled_rows_to_steps():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "prm"}]})
        body = json.loads(request.content)
        seen.append(body)
        data = []
        for index, ids in enumerate(body["input"]):
            # One row of [bad, good] logits per tag; good logit = position of the tag.
            rows = [[0.0, math.log(p)] for p, t in enumerate(ids) if t == TAG]
            data.append({"index": index, "data": rows})
        return httpx.Response(200, json={"data": list(reversed(data))})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    scorer = HTTPPoolingPRM("http://prm:8000/", prm_scorer_config(model="m"), Tok(), client=client)
    traces = [Trace((5, 6), (Step((10, TAG), "a", False), Step((11, EOS), "b", True))),
              Trace((5,), ()),
              Trace((5, TAG), (Step((12,), "c", True),))]  # a tag in the prompt is not a step
    scores = asyncio.run(scorer.score(traces))
    assert seen[0]["input"] == [[5, 6, 10, TAG, 11, TAG], [5, TAG, 12, TAG]]
    assert seen[0]["model"] == "prm" and seen[0]["task"] == "token_classify"
    # softmax([0, log p]) good column = p / (1 + p)
    assert scores[0] == pytest.approx([3 / 4, 5 / 6])
    assert scores[1] == []
    assert scores[2] == pytest.approx([3 / 4])
