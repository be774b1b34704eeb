"""The fill of Pseudocode 1 (Eisenbud et al., NSDI 2016, section 3.4) with numpy: slot -> backend.

maglev.py's docstring says why the computations are exact (deferred acceptance with turn times as
priorities; the position matrix of the last empty slots). Unit-weight pools of `ROUND_POOL` backends
or more run `Rounds` (maglev_rounds.py: pools of up to 0.8 sqrt(M) backends in stages of 10-20
rounds, larger ones one round at a time, the last turns one by one); weighted or small pools run
`Chunks` (maglev_chunks.py). Both share the claim array and the list scan of maglev_scan.py.
"""

from __future__ import annotations

import numpy as np

from rusty_rail.core.maglev_chunks import Chunks
from rusty_rail.core.maglev_rounds import Rounds

ROUND_POOL = 100  # unit-weight pools this large are filled round by round


def fill(offset: np.ndarray, skip: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """Pseudocode 1 over backends 0..n-1 (weights >= 1) given their offsets and skips: slot -> backend."""
    if len(offset) == 1:
        return np.zeros(size, np.int32)
    unit = bool((weights == 1).all())
    engine = Rounds if unit and len(offset) >= ROUND_POOL else Chunks
    claim = engine(offset, skip, weights, size).run()
    # a slot's claim time is the turn that filled it; turn -> backend is the round's layout
    within = claim % int(weights.sum())
    if unit:
        return within
    return np.searchsorted(np.cumsum(weights), within, side="right").astype(np.int32)
