"""The engine's per-request `ttc` records through a real vLLM engine (the session engine:
separate engine-core and worker processes, as `vllm serve` runs on CPU): exact KV blocks
per request, per group of samples with shared prefix blocks counted once, agreement with
the engine-wide block count vLLM's own kv_cache_usage_perc is made of, and thinking tokens
counted from the token ids. How thinking ended is read from the controller where the
scheduler and the worker share a process: checked in a one-process engine."""
import json
import os
import random
import subprocess
import sys
import time

import pytest

from ttc_vllm.testbed import task

pytestmark = pytest.mark.engine


def records(output):
    block = output.kv_transfer_params["ttc"]
    assert set(block) == {"requests", "searches_kv_blocks"}
    return block["requests"]


def test_a_lone_request_holds_ceil_tokens_over_block_size(llm):
    """The last sampled token has no KV entry yet: blocks = ceil((prompt + output - 1) / B)."""
    from vllm import SamplingParams

    block = llm.llm_engine.vllm_config.cache_config.block_size
    for max_tokens in (block - 6, block - 5, 2 * block - 5, 2 * block - 4, 3 * block + 7):
        out = llm.generate(["3+4=?"], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                     ignore_eos=True), use_tqdm=False)[0]
        [record] = records(out)
        kv = record["kv"]
        tokens = len(out.prompt_token_ids) + len(out.outputs[0].token_ids) - 1
        assert kv["peak_blocks"] == -(-tokens // block), (max_tokens, kv)
        assert kv["new_blocks"] + kv["cached_blocks"] == kv["peak_blocks"]
        assert kv["block_seconds"] > 0 and kv["block_size"] == block
        assert record["kind"] == "plain"


def test_concurrent_requests_sum_to_the_engine_wide_blocks_in_use(llm, kv_peak_file):
    """Distinct prompts admitted together and generating in lockstep: the sum of their peaks
    is the engine-wide peak of blocks in use (vLLM's kv_cache_usage_perc x num_blocks,
    written by the scheduler to the peak file), within one block per request."""
    from ttc_vllm_plugins.kv_accounting import read_peak
    from vllm import SamplingParams

    prompts = [task.prompt(p) for p in task.generate("hard", 6, seed=11)]
    kv_peak_file.unlink(missing_ok=True)
    outs = llm.generate(prompts, SamplingParams(max_tokens=100, temperature=1.0, ignore_eos=True,
                                                seed=1), use_tqdm=False)
    time.sleep(0.05)
    peaks = [records(o)[0]["kv"]["peak_blocks"] for o in outs]
    engine_peak = read_peak(kv_peak_file)["peak_used_blocks"]
    assert abs(sum(peaks) - engine_peak) <= len(prompts), (peaks, engine_peak)


def test_samples_of_one_request_share_prompt_blocks_once(llm):
    """n=8 samples of a long prompt: every sample's record arrives (with the last sample's
    output), and the group's peak is the sum of the samples' peaks minus the prompt's full
    blocks that 7 of them found in the prefix cache."""
    from ttc_vllm_plugins.engine_records import mark_samples
    from vllm import SamplingParams

    block = llm.llm_engine.vllm_config.cache_config.block_size
    prompt = task.few_shot_prompt(task.generate("hard", 1, seed=3)[0],
                                  task.generate("medium", 2, seed=3), random.Random(3))
    params = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True, n=8, seed=2)
    mark_samples(params, "samples-of-one")
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    recs = records(out)
    assert len(recs) == 8
    shared = len(out.prompt_token_ids) // block
    assert shared >= 8
    peaks = [r["kv"]["peak_blocks"] for r in recs]
    group_peak = max(r["kv"]["group"]["peak_blocks"] for r in recs)
    assert sorted(r["kv"]["group"]["live_members"] for r in recs) == list(range(8))
    assert group_peak == sum(peaks) - 7 * shared, (peaks, group_peak, shared)
    assert sum(r["kv"]["cached_blocks"] for r in recs) >= 7 * shared


def test_thinking_tokens_are_counted_from_the_token_ids(llm):
    from ttc_vllm.options import TTCOptions
    from vllm import SamplingParams

    prompt = task.prompt(task.generate("hard", 1, seed=4)[0])
    params = SamplingParams(max_tokens=120, temperature=0,
                            extra_args=TTCOptions(max_think=24).to_extra_args())
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    [record] = records(out)
    assert record["kind"] == "controlled"
    tok = llm.get_tokenizer()
    text = tok.decode(out.outputs[0].token_ids)
    assert "</think>" in text
    ids = list(out.outputs[0].token_ids)
    end = tok.convert_tokens_to_ids("</think>")
    assert record["thinking"]["thinking_tokens"] == ids.index(end) == 24
    # separate worker process: the controller's own view is not reachable from the scheduler
    assert record["thinking"]["ended"] == "unknown"


ONE_PROCESS = r"""
import json, sys
def main():
    from ttc_vllm.engine import make_llm
    from ttc_vllm.options import TTCOptions
    from ttc_vllm.testbed import task
    from vllm import SamplingParams
    llm = make_llm(sys.argv[1], kv_cache_memory_bytes=256 << 20, max_num_seqs=8)
    prompt = task.prompt(task.generate("hard", 1, seed=4)[0])
    rows = []
    for options in ({"max_think": 24}, {}):
        params = SamplingParams(max_tokens=200, temperature=0, extra_args={"ttc": options} if options else None)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        rows.append(out.kv_transfer_params["ttc"]["requests"][0])
    print("RECORDS " + json.dumps(rows))
if __name__ == "__main__":
    main()
"""


def test_how_thinking_ended_comes_from_the_controller_in_one_process(tmp_path):
    from tests.live_server import policy_dir

    script = tmp_path / "one_process.py"
    script.write_text(ONE_PROCESS)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR"}
    result = subprocess.run([sys.executable, str(script), policy_dir()], capture_output=True,
                            text=True, env=env, timeout=600)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("RECORDS ")), None)
    assert line is not None, result.stderr[-3000:]
    capped, free = json.loads(line.removeprefix("RECORDS "))
    assert capped["kind"] == "controlled" and free["kind"] == "plain"
    thinking = capped["thinking"]
    assert thinking["ended"] == "budget" and thinking["thinking_tokens"] == 24
    assert thinking["forced"]["conclusion"] > 1 and thinking["forced"]["eos"] == 0
    assert thinking["stop_step"] is not None
    assert free["thinking"]["thinking_tokens"] > 24 and "ended" not in free["thinking"]
