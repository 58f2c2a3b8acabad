"""The ready-ratio gate: which ready instances may join traffic now (pure, PAPER §3.7).

New instances of a Deployment Group take traffic only while the group's in-traffic
prefill:decode ratio stays within a tolerance of its target ratio, so a group never
serves with, say, three prefill instances and no decode to send their KV to. Both
actuators apply it: the Kubernetes DG actuator by setting a pod readiness-gate
condition (``actuators.groups``), the local one by routing (``actuators.local``).
"""

from __future__ import annotations

from typing import Any

from heteroscale.coordinator.core.types import PoolCounts


def within(p: int, d: int, target: tuple[int, int], tolerance: float) -> bool:
    """True when ``p:d`` is within ``tolerance`` (relative) of ``target`` = (P, D).

    Worked example: target 9:7 (1.286), tolerance 0.25: 1:1 is |1 − 1.286| = 0.286 <=
    0.321 → within; 2:1 is 0.714 → not."""
    if p == 0 or d == 0:
        return False
    want = target[0] / target[1]
    return abs(p / d - want) <= tolerance * want + 1e-9


def admit(*, admitted: tuple[int, int], waiting: tuple[int, int], target: tuple[int, int],
          tolerance: float) -> tuple[int, int]:
    """How many waiting (engine-ready) prefill and decode pods to let into traffic.

    Picks the largest admitted totals ``(p, d)`` (``p`` in admitted..admitted+waiting)
    that are within tolerance of ``target``; if none is, the move that gets strictly
    closer to the ratio (or none). Returns the numbers to admit now, per role.
    """
    p0, d0 = admitted
    want = target[0] / target[1]
    best: tuple[Any, ...] | None = None
    for p in range(p0, p0 + waiting[0] + 1):
        for d in range(d0, d0 + waiting[1] + 1):
            if within(p, d, target, tolerance):
                key = (0, -(p + d), abs(p - want * d))
            else:
                key = (1, abs(p - want * d), -(p + d))
            if best is None or key < best[0]:
                best = (key, p, d)
    assert best is not None
    key, p, d = best
    if key[0] == 1 and not abs(p - want * d) < abs(p0 - want * d0):
        return (0, 0)
    return (p - p0, d - d0)


def gate_admit(in_traffic: PoolCounts, candidates: PoolCounts, *, ratio: tuple[int, int],
               tolerance: float) -> PoolCounts:
    """How many ready-but-gated instances of each role may join traffic now.

    ``admit`` ( the most instances that keep
    the DG's in-traffic P:D within ``tolerance`` of the ratio, else a move strictly
    closer to it), plus one local rule: a DG with *no* complete P+D pair in traffic that
    has one ready takes everything ready at once, since a DG that cannot serve is worse
    than an unbalanced one (``admit`` treats an empty DG as perfectly balanced).
    Worked example, ratio 5:2, tolerance 0.34: (0, 0) in traffic with (2, 0) ready waits
    for a decode; (3, 1) ready joins whole (3/1 is within 34% of 2.5).
    """
    p, d = admit(admitted=(in_traffic.prefill, in_traffic.decode),
                 waiting=(candidates.prefill, candidates.decode), target=ratio, tolerance=tolerance)
    cannot_serve = in_traffic.prefill == 0 or in_traffic.decode == 0
    could_serve = (in_traffic.prefill + candidates.prefill > 0) and (in_traffic.decode + candidates.decode > 0)
    if p == d == 0 and cannot_serve and could_serve:
        return candidates
    return PoolCounts(p, d)
