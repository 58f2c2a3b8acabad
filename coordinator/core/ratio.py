"""The P/D ratio rule: how many prefill instances go with ``D`` decode instances (pure).

For ``D`` decode instances and ratio ``p:d`` the prefill count is
``P = floor(D·p/d + 1/2)`` in exact rational arithmetic — the integer nearest to
``D·p/d``, ties rounded up (towards more prefill, which protects TTFT) — and at least
1 while ``D ≥ 1``. For a fixed ``D`` this minimises ``|P/D − p/d|``. Example 9:7 with
D = 8: 8·9/7 = 10.29 → P = 10.
"""

from __future__ import annotations

import math
from fractions import Fraction


def prefill_for_ratio(decode: int, pd_ratio: tuple[int, int]) -> int:
    """The prefill count that keeps P:D nearest ``pd_ratio`` (see module doc)."""
    if decode <= 0:
        return 0
    p, d = pd_ratio
    return max(1, math.floor(Fraction(decode * p, d) + Fraction(1, 2)))
