"""A vLLM scheduler that records the peak number of KV-cache blocks held by requests.

vLLM exports only the current engine-wide usage gauge; "how many blocks did this search
need at its worst" has to be read where blocks are allocated, in the EngineCore's
scheduler. `KVAccountingScheduler` is the stock V1 scheduler plus, after every `schedule()`,
a look at the block pool: blocks in use = all blocks - free ones - the null block. Blocks
kept only as prefix-cache entries (no request holds them) count as free, exactly as vLLM's
own `kv_cache_usage_perc` counts them; a block shared by several requests counts once.

Enable it with `LLM(scheduler_cls="ttc_vllm_plugins.kv_accounting.KVAccountingScheduler")`
(or `--scheduler-cls` on `vllm serve`) and set `TTC_VLLM_KV_PEAK_FILE=PATH`: whenever the
peak grows the scheduler rewrites PATH (atomically) as JSON
{"peak_used_blocks", "num_blocks", "block_size", "schedule_calls"}. The EngineCore runs in
its own process, so a file is the simplest way out; `read_peak(PATH)` reads it back.
Removing PATH while the engine is idle restarts the peak (the next allocation writes it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ttc_vllm_plugins.vllm_compat import scheduler_base, used_kv_blocks

PEAK_FILE_ENV = "TTC_VLLM_KV_PEAK_FILE"
SCHEDULER_CLS = "ttc_vllm_plugins.kv_accounting.KVAccountingScheduler"


class KVAccountingScheduler(scheduler_base()):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._peak_file = os.environ.get(PEAK_FILE_ENV) or None
        self.peak_used_blocks = 0
        self.schedule_calls = 0

    def used_blocks(self) -> int:
        return used_kv_blocks(self)[0]

    def schedule(self, *args, **kwargs):
        out = super().schedule(*args, **kwargs)
        self.schedule_calls += 1
        if self._peak_file is not None and self.peak_used_blocks and not os.path.exists(self._peak_file):
            self.peak_used_blocks = 0  # the reader removed the file: start a new peak
        used = self.used_blocks()
        if used > self.peak_used_blocks:
            self.peak_used_blocks = used
            self._write()
        return out

    def _write(self) -> None:
        if self._peak_file is None:
            return
        record = {"peak_used_blocks": self.peak_used_blocks,
                  "num_blocks": used_kv_blocks(self)[1],
                  "block_size": self.block_size,
                  "schedule_calls": self.schedule_calls}
        tmp = f"{self._peak_file}.tmp{os.getpid()}"
        Path(tmp).write_text(json.dumps(record))
        os.replace(tmp, self._peak_file)


def read_peak(path: str | os.PathLike) -> dict:
    """The last record the scheduler wrote ({"peak_used_blocks": 0} before any allocation)."""
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {"peak_used_blocks": 0}
