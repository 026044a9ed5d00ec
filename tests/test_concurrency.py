"""Tests for forwarder.concurrency: how many associations "auto" settles on, driven by a clock."""

from __future__ import annotations

import pytest

from forwarder.concurrency import REPROBE_SECONDS, WINDOW_SECONDS, Autoscale


def drive(scale: Autoscale, rate_of: dict[int, float], seconds: float = 30.0) -> list[int]:
    """Feed `scale` stores at `rate_of[level]` inst/s; return the levels it allowed in turn.

    Each new level is "established" at once, as a pool would report it.
    """
    now, levels = 0.0, [scale.allowed]
    scale.established(scale.allowed, now)
    while now < seconds and not scale.settled:
        now += 1.0 / rate_of[scale.allowed]
        before = scale.allowed
        scale.stored(now)
        if scale.allowed != before:
            levels.append(scale.allowed)
            scale.established(scale.allowed, now)
    return levels


@pytest.mark.parametrize(
    ("rates", "maximum", "levels", "reason"),
    [
        # a WAN: every association adds a round trip's worth of stores
        ({1: 12, 2: 24, 3: 36, 4: 48}, 4, [1, 2, 3, 4], "maximum reached"),
        ({1: 12, 2: 24, 3: 36, 4: 48, 5: 60, 6: 72}, 6, [1, 2, 3, 4, 5, 6], "maximum reached"),
        # a LAN where the sender's CPU is the limit: a second association adds little
        ({1: 900, 2: 950}, 4, [1, 2], "no gain past 2"),
        # ... or costs: back to one
        ({1: 900, 2: 700}, 4, [1, 2, 1], "2 was slower than 1"),
        # a peer that serves two at a time at most
        ({1: 50, 2: 100, 3: 101}, 4, [1, 2, 3], "no gain past 3"),
    ],
)
def test_auto_grows_while_throughput_rises(
    rates: dict[int, float], maximum: int, levels: list[int], reason: str
) -> None:
    scale = Autoscale(maximum)
    assert drive(scale, rates) == levels
    assert scale.settled and scale.reason == reason
    assert scale.allowed == levels[-1]


def test_a_fixed_number_is_exactly_that() -> None:
    scale = Autoscale(3, auto=False)
    assert scale.allowed == 3 and scale.settled
    scale.established(3, 0.0)
    for n in range(100):
        scale.stored(n * 0.1)
    scale.refused(3, 1.0)
    scale.limit(1, 1.0)
    assert scale.allowed == 3
    assert scale.describe() == "3"


def test_auto_with_a_maximum_of_one_is_one() -> None:
    scale = Autoscale(1)
    assert scale.allowed == 1 and scale.settled and not scale.auto


def test_a_refused_extra_association_settles_below_it() -> None:
    scale = Autoscale(4)
    assert drive(scale, {1: 10, 2: 20, 3: 30}, seconds=1.3) == [1, 2, 3]
    scale.refused(3, 2.0)
    assert scale.allowed == 2 and scale.settled
    assert scale.reason == "the peer accepts 2"
    assert scale.describe() == "2 (auto, settled: the peer accepts 2)"
    scale.refused(3, 2.1)  # a refusal above the settled level changes nothing
    assert scale.allowed == 2


def test_a_refusal_of_an_old_level_is_ignored() -> None:
    scale = Autoscale(4)
    drive(scale, {1: 10, 2: 20}, seconds=1.0)
    assert scale.allowed == 2
    scale.refused(1, 1.0)  # the first association failing is the destination's problem
    assert scale.allowed == 2 and not scale.settled


def test_measuring_needs_a_whole_window_and_enough_stores() -> None:
    scale = Autoscale(4)
    scale.established(1, 0.0)
    for n in range(100):  # 100 stores in less than a window: not yet a measurement
        scale.stored(WINDOW_SECONDS * n / 200)
    assert scale.allowed == 1
    scale.stored(WINDOW_SECONDS)
    assert scale.allowed == 2


def test_running_out_of_work_voids_the_measurement() -> None:
    """A backlog that ends mid-measurement looks like a slower level; it must not count."""
    scale = Autoscale(4)
    drive(scale, {1: 20, 2: 40}, seconds=0.5)
    assert scale.allowed == 2
    scale.established(2, 2.0)
    scale.stored(2.1)
    scale.interrupted()  # the queue ran dry
    scale.stored(30.0)  # one store long after: ignored
    assert scale.allowed == 2 and not scale.settled
    scale.resumed(100.0)
    for n in range(1, 60):
        scale.stored(100.0 + n / 40)
    assert scale.allowed == 3


def test_stores_before_the_level_is_established_do_not_count() -> None:
    scale = Autoscale(4)
    for n in range(50):
        scale.stored(n * 0.1)
    assert scale.allowed == 1  # nothing established: nothing measured


def test_a_peer_whose_limit_drops_lowers_a_settled_level() -> None:
    scale = Autoscale(4)
    drive(scale, {1: 10, 2: 20, 3: 30, 4: 40})
    assert scale.allowed == 4 and scale.reason == "maximum reached"
    scale.refused(3, 100.0)  # the third association is refused now
    assert scale.allowed == 2 and scale.reason == "the peer accepts 2"
    scale.limit(1, 101.0)  # the first one's re-association refused while another is open
    assert scale.allowed == 1 and scale.settled


def test_a_settled_level_is_measured_again_after_a_while() -> None:
    scale = Autoscale(4)
    drive(scale, {1: 10, 2: 20, 3: 30}, seconds=1.3)
    scale.refused(3, 10.0)
    assert scale.allowed == 2 and scale.settled
    scale.stored(10.0 + REPROBE_SECONDS - 1)  # not yet
    assert scale.settled
    start = 10.0 + REPROBE_SECONDS
    scale.stored(start)  # the peer may take more now: measure 2, then try 3
    assert not scale.settled and scale.allowed == 2
    for n in range(1, 40):
        scale.stored(start + n / 20)
    assert scale.allowed == 3


@pytest.mark.parametrize(
    ("rtt", "maximum", "start"),
    [(0.0003, 4, 1), (0.004, 4, 1), (0.011, 4, 2), (0.021, 4, 4), (0.080, 4, 4), (0.080, 8, 8)],
)
def test_a_far_peer_starts_with_more_associations(rtt: float, maximum: int, start: int) -> None:
    scale = Autoscale(maximum)
    scale.round_trip(rtt)
    assert scale.allowed == start
    scale.round_trip(1.0)  # only the first association's round trip counts
    assert scale.allowed == start


def test_a_round_trip_does_not_move_a_fixed_number() -> None:
    scale = Autoscale(2, auto=False)
    scale.round_trip(0.08)
    assert scale.allowed == 2
