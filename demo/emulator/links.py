"""The emulator's KV-link model: where an instance sits and which links are degraded (pure).

Every emulated instance knows its switch, ``S2/S1`` (``--kv-location``), and the
degraded links of the pretend cluster (``--degrade-link``, repeatable). A KV push
carries the sender's location; the receiving instance paces the transfer to the
modelled link time (modelled KV bytes at ``kv_bandwidth_gbps``) times the slow-down
of the link between the two switches, so both ends' NIXL histograms see it.

A degraded link is written ``NAME[:FACTOR]`` or ``NAME,NAME[:FACTOR]``:

* ``pod-b:4``: every transfer with an end under the switch ``pod-b`` (an S2 or an S1
  name) takes 4 times as long (the link runs at a quarter of its speed);
* ``a-l20,a-h20:3``: transfers between the two switches (either direction) take 3 times
  as long; one side may be the other's parent (``pod-a,b-h20``);
* no factor: 4.

Several matching links multiply (a transfer crossing two slow links is slower still).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

DEFAULT_FACTOR = 4.0
MAX_FACTOR = 1000.0

Location = tuple[str, str]          # (s2, s1)


@dataclass(frozen=True)
class DegradedLink:
    """One slow link: ``ends`` holds one switch name (every link under it) or two (the
    link between them); ``factor`` > 1 is how many times longer a transfer takes."""

    ends: tuple[str, ...]
    factor: float = DEFAULT_FACTOR

    @property
    def text(self) -> str:
        return f"{','.join(self.ends)}:{self.factor:g}"

    def matches(self, a: Location | None, b: Location | None) -> bool:
        """Whether a transfer between switches ``a`` and ``b`` crosses this link."""
        if a is None or b is None:
            return False
        if len(self.ends) == 1:
            return self.ends[0] in a or self.ends[0] in b
        x, y = self.ends
        return (x in a and y in b) or (y in a and x in b)


def parse_degraded_link(text: str) -> DegradedLink:
    """``NAME[:FACTOR]`` or ``NAME,NAME[:FACTOR]`` -> ``DegradedLink``; ``ValueError`` says why."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected SWITCH[:FACTOR] or SWITCH,SWITCH[:FACTOR], got an empty value")
    body, sep, factor_text = text.strip().rpartition(":")
    if not sep:
        body, factor_text = factor_text, ""
    ends = tuple(part.strip() for part in body.split(","))
    if not 1 <= len(ends) <= 2 or any(not e for e in ends):
        raise ValueError(f"expected SWITCH[:FACTOR] or SWITCH,SWITCH[:FACTOR], got {text!r}")
    if len(ends) == 2 and ends[0] == ends[1]:
        raise ValueError(f"a link joins two different switches, got {text!r}")
    factor = DEFAULT_FACTOR
    if factor_text:
        try:
            factor = float(factor_text)
        except ValueError:
            raise ValueError(f"FACTOR must be a number, got {factor_text!r} in {text!r}") from None
        if not (math.isfinite(factor) and 1 < factor <= MAX_FACTOR):
            raise ValueError(f"FACTOR must be above 1 and at most {MAX_FACTOR:g} (times slower), "
                             f"got {factor_text!r} in {text!r}")
    return DegradedLink(ends=ends, factor=factor)


def parse_location(text: str) -> Location:
    """``S2/S1`` -> ``(s2, s1)``; ``ValueError`` says why."""
    s2, sep, s1 = (text or "").partition("/")
    if not sep or not s2 or not s1 or "/" in s1:
        raise ValueError(f"expected S2/S1 (two switch names), got {text!r}")
    return s2, s1


def slowdown(links: Iterable[DegradedLink], a: Location | None, b: Location | None) -> float:
    """How many times longer a transfer between ``a`` and ``b`` takes (1.0: a healthy path)."""
    factor = 1.0
    for link in links:
        if link.matches(a, b):
            factor *= link.factor
    return factor


def unknown_switches(links: Iterable[DegradedLink], switches: Iterable[Location]) -> list[str]:
    """Switch names the links name that the topology does not have (for flag checks)."""
    known = {name for loc in switches for name in loc}
    return sorted({end for link in links for end in link.ends if end not in known})
