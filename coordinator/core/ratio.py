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
    return prefill_for_fraction(decode, Fraction(pd_ratio[0], pd_ratio[1]))


def prefill_for_fraction(decode: int, ratio: Fraction) -> int:
    """The same rule for a ratio held as a fraction (prefill per decode instance), as the
    drift detector's ``adapt`` mode moves it."""
    if decode <= 0:
        return 0
    return max(1, math.floor(decode * ratio + Fraction(1, 2)))


def ratio_text(ratio: Fraction) -> str:
    """``P:D`` with small integers: 9/7 → ``9:7``; 1.3 → ``13:10``."""
    simple = ratio.limit_denominator(16)
    return f"{simple.numerator}:{simple.denominator}"
