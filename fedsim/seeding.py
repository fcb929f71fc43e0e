"""Seeds derived from the experiment seed, so every random stream is reproducible on its own."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on all `parts` (e.g. experiment seed, round, client id)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))
