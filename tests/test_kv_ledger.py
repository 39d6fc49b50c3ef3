"""KVLedger: peaks, block-seconds, cached vs new blocks, and groups whose shared blocks count
once -- pure bookkeeping, driven with explicit times."""
from ttc_vllm.kv_ledger import KVLedger


def test_a_lone_request_integrates_blocks_over_time():
    ledger = KVLedger(block_size=16)
    ledger.open("a", now=0.0)
    ledger.admitted("a", cached_blocks=0)
    ledger.update("a", 2, now=1.0)      # 2 blocks from t=1
    ledger.update("a", 3, now=3.0)      # 3 blocks from t=3
    record = ledger.close("a", now=4.0)
    assert record["peak_blocks"] == 3
    assert record["block_seconds"] == 2 * 2 + 3 * 1
    assert (record["new_blocks"], record["cached_blocks"]) == (3, 0)
    assert record["block_size"] == 16 and "group" not in record
    assert ledger.close("a", now=5.0) is None and ledger.open_requests == 0


def test_prefix_cache_hits_are_not_new_blocks():
    ledger = KVLedger(block_size=16)
    ledger.open("a", now=0.0)
    ledger.admitted("a", cached_blocks=4)
    ledger.update("a", 6, now=0.0)
    record = ledger.close("a", now=1.0)
    assert (record["peak_blocks"], record["cached_blocks"], record["new_blocks"]) == (6, 4, 2)


def test_a_preempted_request_counts_its_reallocation():
    ledger = KVLedger(block_size=16)
    ledger.open("a", now=0.0)
    ledger.update("a", 4, now=0.0)
    ledger.update("a", 0, now=1.0)      # preempted: blocks freed
    ledger.update("a", 5, now=2.0)
    record = ledger.close("a", now=3.0)
    assert record["peak_blocks"] == 5 and record["new_blocks"] == 9
    assert record["block_seconds"] == 4 * 1 + 5 * 1


def test_a_group_counts_shared_blocks_once():
    ledger = KVLedger(block_size=16)
    for rid in ("s0", "s1"):
        ledger.open(rid, now=0.0, group="search")
    ledger.update("s0", 3, now=0.0, block_ids=[1, 2, 3])
    ledger.update("s1", 3, now=0.0, block_ids=[1, 2, 4])   # blocks 1 and 2 shared
    assert ledger.grouped_blocks == 4
    ledger.update("s1", 4, now=1.0, block_ids=[1, 2, 4, 5])
    first = ledger.close("s0", now=2.0)                    # 3 and the shared ones stay with s1
    assert ledger.grouped_blocks == 4
    last = ledger.close("s1", now=3.0)
    assert ledger.grouped_blocks == 0
    assert first["peak_blocks"] == 3 and last["peak_blocks"] == 4
    assert first["group"]["peak_blocks"] == 5 and last["group"]["peak_blocks"] == 5
    # union over time: 4 blocks for 1 s, 5 for 1 s, then s1's 4 blocks for 1 s
    assert last["group"]["block_seconds"] == 4 + 5 + 4
    assert last["group"]["live_members"] == 0
    assert first["peak_blocks"] + last["peak_blocks"] > last["group"]["peak_blocks"]


def test_a_group_outlives_its_members_until_evicted():
    ledger = KVLedger(block_size=16, max_groups=2)
    ledger.open("w1", now=0.0, group="g")
    ledger.update("w1", 2, now=0.0, block_ids=[1, 2])
    ledger.close("w1", now=1.0)
    ledger.open("w2", now=1.0, group="g")                  # the search's next wave
    ledger.update("w2", 1, now=1.0, block_ids=[7])
    record = ledger.close("w2", now=2.0)
    assert record["group"]["block_seconds"] == 2 + 1 and record["group"]["peak_blocks"] == 2
    for name in ("h1", "h2"):                              # two more idle groups: g goes
        ledger.open(name, now=3.0, group=name)
        ledger.close(name, now=3.0)
    ledger.open("w3", now=4.0, group="g")
    assert ledger.close("w3", now=4.0)["group"]["block_seconds"] == 0
