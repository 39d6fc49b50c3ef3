"""KVAccountingScheduler in the session engine: the peak KV blocks it records come from the
scheduler's block pool, and prefix sharing shows in them."""
import random
import time

import pytest

from ttc_vllm.testbed import task

pytestmark = pytest.mark.engine


def peak_of(llm, kv_peak_file, prompts, params):
    from ttc_vllm_plugins.kv_accounting import read_peak

    kv_peak_file.unlink(missing_ok=True)  # the scheduler restarts its peak
    llm.generate(prompts, params, use_tqdm=False)
    time.sleep(0.05)
    return read_peak(kv_peak_file)


def test_peak_blocks_count_shared_prompt_blocks_once(llm, kv_peak_file):
    from vllm import SamplingParams

    block = llm.llm_engine.vllm_config.cache_config.block_size
    tok = llm.get_tokenizer()
    long_prompt = task.few_shot_prompt(task.generate("hard", 1, seed=3)[0],
                                       task.generate("medium", 2, seed=3), random.Random(3))
    prompt_tokens = len(tok.encode(long_prompt, add_special_tokens=False))
    params = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    assert prompt_tokens > 8 * block
    one = peak_of(llm, kv_peak_file, [long_prompt], params)
    # one request: its prompt + 8 tokens, in whole blocks (vLLM may hold one spare block)
    need = -(-(prompt_tokens + 8) // block)
    assert need <= one["peak_used_blocks"] <= need + 1
    assert one["block_size"] == block and one["num_blocks"] > need
    # eight requests of the same prompt, admitted together: the prompt's full blocks are
    # held once (prefix caching), each request adds only its own tail
    eight = peak_of(llm, kv_peak_file, [long_prompt] * 8, params)
    assert eight["peak_used_blocks"] < 3 * one["peak_used_blocks"]
    assert eight["peak_used_blocks"] >= one["peak_used_blocks"]
    # removing the file restarts the peak: a short request alone now reports its own few blocks
    short = peak_of(llm, kv_peak_file, [task.prompt(task.generate("easy", 1, seed=3)[0])], params)
    assert 1 <= short["peak_used_blocks"] <= 3 < one["peak_used_blocks"]
