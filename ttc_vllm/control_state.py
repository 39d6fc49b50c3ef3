"""The per-slot state layout the controller step keeps, shared by its torch step
(ttc_vllm/control.py) and its numba kernel (ttc_vllm/control_cpu.py). Pure constants."""
from __future__ import annotations

import numpy as np

PHASE_INACTIVE, PHASE_BEFORE, PHASE_THINKING, PHASE_FORCING, PHASE_ANSWERING, PHASE_DONE = range(6)
PHASE_NAMES = ("inactive", "before", "thinking", "forcing", "answering", "done")
SEQ_CONCLUSION, SEQ_CONTINUATION, SEQ_EOS = range(3)
REASON_NONE, REASON_NATURAL, REASON_BUDGET, REASON_HALT, REASON_STOP = range(5)
REASON_NAMES = ("none", "natural", "budget", "halt", "stop")
UNLIMITED = 1 << 60   # "no cap" in the int64 state; every stored value is clamped to it
FLOAT32_MAX = float(np.finfo(np.float32).max)

# Columns of the int64 per-slot state matrix (one gather / one scatter per step).
(C_PHASE, C_COUNT, C_SEEN, C_CAP, C_OUTLIM, C_MIN, C_EXT, C_MAXEXT, C_KIND, C_FPOS, C_REASON,
 C_HSTEP, C_LEN_CONC, C_LEN_CONT, C_LEN_EOS, C_HON, C_HTOPK, C_HABOVE, C_HSTOP, C_HMIN,
 C_SIGNAL, C_CONC_END) = range(22)
NUM_INT_COLS = 22
# Columns of the float32 per-slot state matrix.
F_TAU, F_PENDING = range(2)
