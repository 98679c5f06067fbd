"""SAE's pruning rate per tick follows the cyclic schedule (paper sections 2.4 and 3.7); a tick
is a step of the GA, or a child of the niches loop."""

from __future__ import annotations

import math

import pytest

from mergekit_sae.search.sae_settings import Schedule


def rates(schedule: Schedule, ticks: range) -> list[float]:
    """The rate at 1-based ticks (step t of the GA uses tick t - 1 of the schedule)."""
    return [schedule.rate(tick - 1) for tick in ticks]


# Default: cycles of length 3, 6, 12 (T0 = 3, T_mult = 2), s_min 0.1, s_max 0.6.
# Inside a cycle of length T at position t: 0.1 + 0.5 * (1 - cos(pi t / (T - 1))) / 2.
# Hand values: cos(pi/5) = 0.809017, cos(2pi/5) = 0.309017, cos(pi/11) = 0.959493,
# cos(2pi/11) = 0.841254.
DEFAULT_RATES = [
    0.1,  # step 1: cycle 1 (T=3), t=0
    0.35,  # step 2: t=1, (1 - cos(pi/2)) / 2 = 0.5
    0.6,  # step 3: t=2, (1 - cos(pi)) / 2 = 1
    0.1,  # step 4: cycle 2 (T=6), t=0
    0.1 + 0.5 * (1 - 0.809017) / 2,  # step 5: t=1
    0.1 + 0.5 * (1 - 0.309017) / 2,  # step 6: t=2
    0.1 + 0.5 * (1 + 0.309017) / 2,  # step 7: t=3, cos(3pi/5) = -cos(2pi/5)
    0.1 + 0.5 * (1 + 0.809017) / 2,  # step 8: t=4
    0.6,  # step 9: t=5
    0.1,  # step 10: cycle 3 (T=12), t=0
    0.1 + 0.5 * (1 - 0.959493) / 2,  # step 11: t=1
    0.1 + 0.5 * (1 - 0.841254) / 2,  # step 12: t=2
]


def test_default_schedule_matches_hand_values() -> None:
    assert rates(Schedule(), range(1, 13)) == pytest.approx(DEFAULT_RATES, abs=1e-6)


def test_no_growth_repeats_the_first_cycle() -> None:
    assert rates(Schedule(t_mult=1), range(1, 13)) == pytest.approx([0.1, 0.35, 0.6] * 4, abs=1e-12)


def test_cycle_of_length_one_stays_at_s_min() -> None:
    assert rates(Schedule(s_min=0.2, s_max=0.9, t0=1, t_mult=1), range(1, 5)) == [0.2] * 4


def test_custom_range_first_cycle() -> None:
    schedule = Schedule(s_min=0.05, s_max=0.9, t0=2, t_mult=3)
    # cycle lengths 2, 6: step 1 -> 0.05, step 2 -> 0.9, step 3 -> 0.05, step 4 -> t=1 of 6
    expected = [0.05, 0.9, 0.05, 0.05 + 0.85 * (1 - math.cos(math.pi / 5)) / 2]
    assert rates(schedule, range(1, 5)) == pytest.approx(expected, abs=1e-12)
