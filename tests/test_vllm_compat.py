"""The vLLM compatibility layer (plugins/vllm_compat.py): a missing or moved vLLM internal
turns off only the feature that needs it, never the engine.

Pure tests check the guards; the engine tests start a real vLLM engine in a subprocess
where an attribute ttc-vllm reaches -- the V2 runner's logits-processor base class in its
package, the tokenizer loader the controls use -- is gone, as after a vLLM release that
renames or moves it, and compare its plain greedy output with the session engine's.
(Hiding a whole vLLM module breaks vLLM itself: its own CPU worker imports the V2 package.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from ttc_vllm_plugins import vllm_compat  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Installed first in every process of the engine (sitecustomize on PYTHONPATH): when the
# compatibility layer is first imported, TTC_TEST_HIDE = "module:attr" is deleted from the
# (already loaded) vLLM module -- what ttc-vllm sees once a release renames or moves it,
# while vLLM's own modules, which imported it earlier, keep working.
HIDE_HOOK = textwrap.dedent('''
    import importlib, importlib.abc, os, sys

    _module, _, _attr = os.environ.get("TTC_TEST_HIDE", "").partition(":")

    class _Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ttc_vllm_plugins.vllm_compat":
                target_module = importlib.import_module(_module)
                if hasattr(target_module, _attr):
                    delattr(target_module, _attr)
            return None

    if _module and _attr:
        sys.meta_path.insert(0, _Hide())
''')

ENGINE_SCRIPT = textwrap.dedent('''
    import json, sys

    def main():
        from vllm import SamplingParams
        from ttc_vllm.engine import make_llm

        llm = make_llm(sys.argv[1], kv_cache_memory_bytes=256 << 20, max_num_seqs=8)
        prompt = sys.argv[2]
        plain = llm.generate([prompt], SamplingParams(max_tokens=60, temperature=0), use_tqdm=False)
        capped = llm.generate([prompt], SamplingParams(max_tokens=120, temperature=0,
                              extra_args={"ttc": {"max_think": 12, "conclusion": None}}), use_tqdm=False)
        print("RESULT " + json.dumps({"plain": list(plain[0].outputs[0].token_ids),
                                      "capped": list(capped[0].outputs[0].token_ids)}))

    if __name__ == "__main__":   # the engine core is a spawned process that imports this file
        main()
''')


def test_optional_names_the_feature_it_turns_off(caplog, monkeypatch):
    monkeypatch.setattr(vllm_compat, "_warned", set())
    monkeypatch.setitem(sys.modules, "vllm.no_such_module", None)   # import raises
    with caplog.at_level("WARNING", logger="ttc_vllm.plugins.compat"):
        assert vllm_compat.optional("vllm.no_such_module", "X", "feature A") is None
        assert vllm_compat.optional("vllm.no_such_module", "X", "feature A") is None
        assert vllm_compat.optional("json", "no_such_name", "feature B") is None
    assert vllm_compat.optional("json", "dumps", "feature C") is json.dumps
    text = caplog.text
    assert text.count("feature A is off") == 1 and "vllm.no_such_module.X is missing" in text
    assert "feature B is off" in text and "feature C" not in text


def test_without_the_v2_module_the_bases_are_v1_only(monkeypatch):
    monkeypatch.setitem(sys.modules, vllm_compat.V2_LOGITS, None)
    bases = vllm_compat.logits_processor_bases()
    from vllm.v1.sample.logits_processor import LogitsProcessor

    assert bases == (LogitsProcessor,)


def test_the_version_check_says_what_is_supported(caplog, monkeypatch):
    vllm_compat.check_version.cache_clear()
    monkeypatch.setattr(vllm_compat, "vllm_version", lambda: "0.40.1")
    with caplog.at_level("INFO", logger="ttc_vllm.plugins.compat"):
        assert vllm_compat.check_version() is False
    assert "outside the supported 0.32.x, 0.33.x" in caplog.text
    vllm_compat.check_version.cache_clear()
    monkeypatch.setattr(vllm_compat, "vllm_version", lambda: "0.32.0")
    assert vllm_compat.check_version() is True
    vllm_compat.check_version.cache_clear()


def test_a_step_that_raises_turns_the_controls_off_and_passes_the_logits(caplog):
    from ttc_vllm_plugins.logits import TTCLogitsProcessor

    class Broken:
        def apply(self, logits):
            raise AttributeError("'InputBatch' object has no attribute 'output_ids'")

    proc = TTCLogitsProcessor.__new__(TTCLogitsProcessor)
    proc.runner, proc._v1, proc._v2 = "v1", Broken(), None
    logits = torch.randn(2, 5)
    with caplog.at_level("ERROR", logger="ttc_vllm.plugins"):
        assert proc.apply(logits) is logits
    assert not proc.active and "controls are off" in caplog.text
    assert proc.apply(logits) is logits   # and stays off, quietly


def test_search_is_off_when_no_handler_can_be_wrapped(caplog):
    class State:
        pass

    state = State()
    with caplog.at_level("WARNING", logger="ttc_vllm.plugins.compat"):
        assert vllm_compat.wrap_handler_engine_clients(state, lambda c: c) == 0
    from ttc_vllm_plugins.controller import SamplingController

    from ttc_vllm.testbed.tokenizer import build_tokenizer

    class Client:
        class renderer:
            tokenizer = build_tokenizer()

        class model_config:
            max_model_len = 64

    controller = SamplingController.install(state, Client(), scorer=None)
    assert not controller.limits.search_enabled


def run_hidden_engine(tmp_path: Path, hide: str, prompt: str) -> tuple[dict, str]:
    from tests.conftest import policy_dir

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HIDE_HOOK)
    env = {**os.environ, "TTC_TEST_HIDE": hide,
           "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(policy_dir()), prompt],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), log


@pytest.fixture(scope="module")
def baseline(llm):
    from vllm import SamplingParams

    from ttc_vllm.testbed.task import generate, prompt

    text = prompt(generate("hard", 1, 11)[0])
    out = llm.generate([text], SamplingParams(max_tokens=60, temperature=0), use_tqdm=False)
    return text, list(out[0].outputs[0].token_ids)


def thinking(tokenizer, ids: list[int]) -> int:
    end = tokenizer.convert_tokens_to_ids("</think>")
    return ids.index(end) if end in ids else len(ids)


@pytest.mark.engine
def test_engine_starts_when_the_v2_processor_base_moves(tmp_path, baseline, tokenizer):
    """vLLM 0.32 already turned the V2 module into a package; a release that stops
    re-exporting its `LogitsProcessor` there must cost only the V2 controls."""
    text, plain = baseline
    result, log = run_hidden_engine(tmp_path, f"{vllm_compat.V2_LOGITS}:LogitsProcessor", text)
    assert "the thinking controls on the V2 model runner is off" in log
    assert result["plain"] == plain                       # plain requests unchanged
    assert thinking(tokenizer, result["capped"]) <= 12    # the V1 controls still on
    assert thinking(tokenizer, plain) > 12


@pytest.mark.engine
def test_engine_starts_when_the_tokenizer_loader_is_renamed(tmp_path, baseline, tokenizer):
    text, plain = baseline
    result, log = run_hidden_engine(tmp_path, f"{vllm_compat.TOKENIZERS}:cached_tokenizer_from_config",
                                    text)
    assert "the thinking controls (the engine's tokenizer) is off" in log
    assert result["plain"] == plain
    # the controls could not resolve their texts: the request ran uncontrolled, not failed
    assert result["capped"][:60] == plain
