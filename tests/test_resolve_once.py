"""Options are validated once per HTTP request: counted (TTCOptions validations and parses
of the options text) on the real code path of the API process -- the middleware's
`plan_request`, then vLLM's own admission validator (`validate_logits_processors_parameters`,
which runs every processor's `validate_params`) with the processor loaded twice, as an
engine that has it both as entry point and explicitly does -- and of an engine worker."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.v1.sample.logits_processor import validate_logits_processors_parameters  # noqa: E402

import ttc_vllm.options as options_module  # noqa: E402
from ttc_vllm.engine import LOGITS_PROCESSOR  # noqa: E402
from ttc_vllm.options import PARSED, TTCOptions  # noqa: E402
from ttc_vllm_plugins import logits_common  # noqa: E402
from ttc_vllm_plugins.logits import TTCLogitsProcessor  # noqa: E402
from ttc_vllm_plugins.request_rewrite import ServerLimits, plan_request  # noqa: E402

CHAT = {"model": "m", "messages": [{"role": "user", "content": "3+4=?"}], "max_tokens": 200}


class Counts:
    def __init__(self, monkeypatch):
        self.validations = 0
        self.parses = 0
        validate = TTCOptions.model_validate.__func__
        loads = json.loads

        def counting_validate(cls, *args, **kwargs):
            self.validations += 1
            return validate(cls, *args, **kwargs)

        class CountingJSON:
            JSONDecodeError = json.JSONDecodeError
            dumps = staticmethod(json.dumps)

            @staticmethod
            def loads(text, *args, **kwargs):
                self.parses += 1
                return loads(text, *args, **kwargs)

        monkeypatch.setattr(TTCOptions, "model_validate", classmethod(counting_validate))
        monkeypatch.setattr(options_module, "json", CountingJSON)


@pytest.fixture
def counts(monkeypatch):
    PARSED.clear()   # a fresh process
    yield Counts(monkeypatch)
    PARSED.clear()


def admit_in_api_process(xargs: dict) -> None:
    """What vLLM does with a request's params before the scheduler sees it."""
    params = SamplingParams(max_tokens=200, extra_args=xargs)
    validate_logits_processors_parameters([TTCLogitsProcessor, LOGITS_PROCESSOR], params)


def test_a_ttc_request_is_validated_once(counts):
    plan = plan_request({**CHAT, "ttc": {"max_think": 40, "halting": {"threshold": 2.0}}},
                        ServerLimits())
    admit_in_api_process({"ttc": plan.body["vllm_xargs"]["ttc"]})
    assert (counts.validations, counts.parses) == (1, 0)


def test_a_sixteen_trace_search_is_validated_once(counts):
    plan = plan_request({**CHAT, "ttc": {"max_think": 40, "search": {"strategy": "majority", "n": 16}}},
                        ServerLimits())
    controls = plan.body["vllm_xargs"]["ttc"]   # what every engine request of the search carries
    for _ in range(16):
        admit_in_api_process({"ttc": controls})
    assert (counts.validations, counts.parses) == (1, 0)


def test_an_engine_worker_parses_each_distinct_text_once(counts):
    controls = TTCOptions(max_think=40).sample_controls()
    PARSED.clear()   # the worker is another process: it has not seen the text
    for _ in range(16):
        assert logits_common.options_or_none(SamplingParams(extra_args={"ttc": controls})).max_think == 40
    assert (counts.validations, counts.parses) == (1, 1)


def test_bad_input_keeps_its_400_naming_the_field(counts):
    for _ in range(2):   # a refusal is not remembered: refused again, with the same words
        with pytest.raises(VLLMValidationError, match="ttc.max_think"):   # vLLM's 400
            admit_in_api_process({"ttc": '{"max_think": -1}'})
