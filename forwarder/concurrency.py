"""How many associations a destination gets: a fixed number, or "auto", grown while it pays.

On a WAN each C-STORE waits a round trip for its response, so a peer tens of milliseconds away
takes instances only as fast as 1/RTT per association; parallel associations are what win
there. On a LAN the sender's CPU is the limit and more associations gain little. "auto" finds
out instead of asking the operator: it starts with one association, adds one when the last one
added raised the throughput by at least `GAIN`, stops at the first that did not (dropping it
again if it made things slower), and never goes past the maximum. A peer that refuses an extra
association settles it at what the peer accepts; that is not a failure of the destination.

This module only decides; the callers (``forwarder send``'s pool and the daemon's workers)
open and close the associations and report what happened, with the clock passed in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_ASSOCIATIONS",
    "GAIN",
    "MAX_ASSOCIATIONS",
    "RTT_PER_ASSOCIATION",
    "WINDOW_SECONDS",
    "WINDOW_STORES",
    "Autoscale",
]

MAX_ASSOCIATIONS = 16
"""The most parallel associations to one peer, configured or automatic."""
DEFAULT_MAX_ASSOCIATIONS = 4
"""How far "auto" goes unless told otherwise (many PACS limit associations per caller)."""

GAIN = 1.15
"""An extra association stays when throughput rose by at least this factor."""
LOSS = 0.95
"""Below this factor of the rate before it, the newest association is dropped again."""
WINDOW_SECONDS = 0.25
"""The shortest measurement of one level (and at least `WINDOW_STORES` stores): short, since
every window is time spent below the best level (a 300-image series 20 ms away takes ~2 s at
four associations), and long enough for a few hundred stores on a LAN."""
WINDOW_STORES = 8
RTT_PER_ASSOCIATION = 0.005
"""A round trip of this many seconds is worth one association from the start: a peer 20 ms
away starts at four instead of climbing there one measured level at a time (on a 300-image
series the climb costs a third of the time), a LAN peer (well under 5 ms) starts at one. A
round trip is what parallel associations hide, whether the network or the peer spends it."""
REPROBE_SECONDS = 600.0
"""How long a settled level holds before "auto" measures again (the peer or the path change)."""


@dataclass
class _Phase:
    level: int
    start: float
    stores: int = 0


class Autoscale:
    """The number of associations allowed now, for one destination; thread-safe.

    Parameters
    ----------
    maximum : int
        The most associations ever allowed (the fixed number when not `auto`).
    auto : bool
        False: exactly `maximum`, always.
    window_seconds, window_stores : float, int
        The shortest measurement of one level: this long, and this many stores.
    """

    def __init__(
        self,
        maximum: int,
        *,
        auto: bool = True,
        window_seconds: float = WINDOW_SECONDS,
        window_stores: int = WINDOW_STORES,
    ) -> None:
        if maximum < 1:
            raise ValueError(f"maximum must be at least 1, got {maximum}")
        self.maximum = maximum
        self.auto = auto and maximum > 1
        self.allowed = 1 if self.auto else maximum
        self.peak = self.allowed  # the most allowed at any time
        self.settled = not self.auto
        self.reason = "auto" if self.auto else "fixed"
        self._rates: dict[int, float] = {}  # measured inst/s per level
        self._phase: _Phase | None = None
        self._lock = threading.Lock()
        self._window = (window_seconds, window_stores)
        self._settled_at = 0.0
        self._hinted = False
        self.answered_at = float("-inf")  # when the peer last answered a store (monotonic)

    def describe(self) -> str:
        """A short text for logs and status: ``3 (auto, settled: no gain past 3)``."""
        if not self.auto:
            return f"{self.allowed}"
        state = f"settled: {self.reason}" if self.settled else "probing"
        return f"{self.allowed} (auto, {state})"

    def round_trip(self, seconds: float) -> None:
        """The first association's A-ASSOCIATE was answered in `seconds`: the network round
        trip plus the peer's own time, what every store's response waits for as well.

        Starts "auto" at one association per `RTT_PER_ASSOCIATION` of it (at most the
        maximum); it climbs on from there as usual. Only the first call counts.
        """
        with self._lock:
            if self._hinted or self.settled:
                return
            self._hinted = True
            level = min(self.maximum, int(seconds / RTT_PER_ASSOCIATION))
            if level > self.allowed:
                self.allowed = level
                self.peak = max(self.peak, level)
                self._phase = None

    def established(self, level: int, now: float) -> None:
        """The association that makes `level` is up and has answered its first store:
        measure that level from `now` (its TCP connection is past the first round trips)."""
        with self._lock:
            self.answered_at = now
            if self.settled or level != self.allowed:
                return
            self._phase = _Phase(level, now)

    def interrupted(self) -> None:
        """Work ran out (or stalled for another reason): the running measurement is void."""
        with self._lock:
            if self._phase is not None:
                self._phase = _Phase(self._phase.level, float("inf"))

    def resumed(self, now: float) -> None:
        """Work is there again after `interrupted`: measure the current level afresh."""
        with self._lock:
            if self._phase is not None and self._phase.start == float("inf"):
                self._phase = _Phase(self._phase.level, now)

    def stored(self, now: float, n: int = 1) -> None:
        """`n` stores finished at `now` (any outcome with a response); may change `allowed`."""
        with self._lock:
            self.answered_at = max(self.answered_at, now)
            if self.settled:
                self._maybe_reprobe(now)
                return
            phase = self._phase
            if phase is None or now < phase.start:
                return
            phase.stores += n
            elapsed = now - phase.start
            if elapsed < self._window[0] or phase.stores < self._window[1]:
                return
            rate = phase.stores / elapsed
            self._rates[phase.level] = rate
            self._phase = None
            before = self._rates.get(phase.level - 1)
            if before is not None and rate < before * LOSS:
                why = f"{phase.level} was slower than {phase.level - 1}"
                self._settle(phase.level - 1, why, now)
            elif before is not None and rate < before * GAIN:
                self._settle(phase.level, f"no gain past {phase.level}", now)
            elif phase.level >= self.maximum:
                self._settle(phase.level, "maximum reached", now)
            else:
                self.allowed = phase.level + 1
                self.peak = max(self.peak, self.allowed)

    def refused(self, level: int, now: float) -> None:
        """The association that would make `level` could not be opened while the ones below
        it were: the peer accepts `level` - 1 (for now). Settles there, even when settled
        higher before (a peer whose limit dropped)."""
        if level > 1:
            self.limit(level - 1, now)

    def limit(self, accepted: int, now: float) -> None:
        """The peer accepts no more than `accepted` associations now: settle at most there."""
        with self._lock:
            if not self.auto or accepted >= self.allowed:
                return
            self._phase = None
            self._settle(accepted, f"the peer accepts {max(1, accepted)}", now)

    def _maybe_reprobe(self, now: float) -> None:
        """Measure again from the settled level once it has held for `REPROBE_SECONDS`."""
        if not self.auto or now - self._settled_at < REPROBE_SECONDS:
            return
        if self.allowed >= self.maximum and self.reason == "maximum reached":
            return
        self.settled = False
        self.reason = "auto"
        self._rates.clear()
        self._phase = _Phase(self.allowed, now)

    def _settle(self, level: int, reason: str, now: float) -> None:
        self.allowed = max(1, level)
        self.settled = True
        self.reason = reason
        self._settled_at = now
