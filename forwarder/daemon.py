"""The daemon: wires the stages (watch -> enqueue -> deliver -> dispose) and runs their life."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from forwarder import __version__
from forwarder.breaker import Breaker
from forwarder.config import ConfigError, Destination, Settings
from forwarder.contexts import ContextSpec
from forwarder.deliver import Crew, Rules, Worker, stop_workers
from forwarder.dispose import Disposer, Layout
from forwarder.enqueue import Enqueuer, Intake
from forwarder.errors import EX_CANTCREAT, EX_SOFTWARE
from forwarder.events import Events
from forwarder.inodes import InodeIndex
from forwarder.logs import fields, iso
from forwarder.metrics import NO_METRICS, Metrics, start_metrics
from forwarder.notify import Notifier
from forwarder.outbox import Outbox, OutboxCorruptError, OutboxError, State
from forwarder.preflight import load_for_daemon
from forwarder.retention import Retention, still_in
from forwarder.trouble import OutboxTrouble, damaged
from forwarder.watcher import Watcher

__all__ = ["INBOX_LOCK", "Daemon"]

LOGGER = logging.getLogger("forwarder.daemon")

INBOX_LOCK = ".forwarder.lock"
"""The lock file in each watched folder; the watcher always ignores it."""
STATUS_SECONDS = 5.0
"""How often the status line goes to systemd (`systemctl status`)."""
MIN_LEASE_CHECK_SECONDS = 1.0
"""Expired leases are looked for every quarter lease, but not more often than this."""
STALL_MARGIN_SECONDS = 60.0
"""Added to twice the longest timeouts: a batch stuck longer than that is hung."""
DEFAULT_STALL_SECONDS = 60.0
"""The timeouts assumed without any destination."""
PRUNE_AFTER_ERROR_SECONDS = 60.0
"""Retention tries again this long after the outbox refused a step."""
MIN_WAKE_SECONDS = 0.01
"""The main loop sleeps at least this long between steps."""


class Daemon:
    """Owns the outbox and the stages: the watcher, the enqueuer, one crew of workers per
    destination, the disposer; starts, serves, reloads and stops them, and says how they are."""

    def __init__(
        self, settings: Settings, config_path: Path | None, notifier: Notifier | None = None
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.outbox = Outbox(settings.outbox.path)
        self.trouble = OutboxTrouble()
        self.events = Events()
        self.metrics: Metrics = NO_METRICS
        self.stopping = threading.Event()
        self.hard_stop = threading.Event()
        self.reload_requested = threading.Event()
        self.nudge_requested = threading.Event()
        self.wakeup = threading.Event()
        self.exit_status = 0
        self._exit_lock = threading.Lock()
        inodes = InodeIndex(track_all=settings.watch.follow_symlinks)
        self.disposer = Disposer(
            self.outbox,
            Layout.of(settings),
            self.events,
            inodes=inodes,
            forget=self._forget,
            queued=self.wake_workers,
        )
        self.enqueuer = Enqueuer(
            self.outbox,
            Intake.of(settings),
            self.disposer,
            inodes,
            self.trouble,
            forget=self._forget,
            queued=self.wake_workers,
            fatal=self.die,
        )
        self.retention = _retention(self.outbox, settings)
        self.watcher: Watcher | None = None
        self.crews: dict[str, Crew] = {}
        self.breakers: dict[str, Breaker] = {}  # kept across reloads, as the outbox keeps them
        self._retired: list[Worker] = []  # stopped by a reload while still in a store
        self._recovered_at_start = False
        self._prune_at = 0.0  # monotonic: when retention takes its next step

    @property
    def workers(self) -> list[Worker]:
        return [w for crew in self.crews.values() for w in crew.workers]

    def die(self, reason: str, status: int) -> None:
        """A stage cannot go on: stop the daemon with a non-zero exit `status`, so that the
        supervisor (systemd, Docker) notices and restarts it, instead of living on as a
        zombie whose health says ok. The first reason wins."""
        with self._exit_lock:
            first = self.exit_status == 0
            if first:
                self.exit_status = status
        if first:
            LOGGER.critical(f"stopping: {reason}", extra=fields(outcome="fatal"))
        self.stopping.set()
        self.wakeup.set()

    def damaged(self, where: str, exc: OutboxCorruptError) -> None:
        """The outbox turned out damaged while running: stop (exit 73), saying what to do."""
        self.die(damaged(where, exc, self.outbox.path), EX_CANTCREAT)

    # -- wiring ---------------------------------------------------------------------

    def wake_workers(self) -> None:
        for crew in self.crews.values():
            crew.wake()

    def _forget(self, path: Path) -> None:
        if self.watcher is not None:
            self.watcher.forget(path)

    def _start_crews(
        self,
        destinations: Sequence[Destination],
        contexts: dict[str, list[ContextSpec]] | None = None,
    ) -> None:
        """Start a crew of workers per destination (`contexts`: what extra associations of a
        restarted destination propose, known from before)."""
        now = time.time()
        rules = Rules.of(self.settings)
        for dest in destinations:
            breaker = self.breakers.get(dest.name)
            if breaker is None:
                breaker = self.breakers[dest.name] = Breaker(dest.name, self.outbox, now)
            else:
                breaker.load(now)
            crew = self.crews[dest.name] = Crew.of(dest, rules, breaker)
            crew.contexts = (contexts or {}).get(dest.name, [])
            for n in range(crew.scale.maximum):
                worker = Worker(
                    crew,
                    n,
                    outbox=self.outbox,
                    events=self.events,
                    metrics=self.metrics,
                    trouble=self.trouble,
                    done=self.disposer.done,
                    fatal=self.die,
                    hard_stop=self.hard_stop,
                )
                crew.workers.append(worker)
                worker.start()

    def _keepalive(self) -> None:
        self._heartbeat()
        if self.notifier.watchdog_interval() is not None and self.stuck() is None:
            self.notifier.watchdog()

    def _make_watcher(self) -> Watcher:
        w = self.settings.watch
        return Watcher(
            w.paths,
            self.enqueuer.offer,
            recursive=w.recursive,
            follow_symlinks=w.follow_symlinks,
            poll=w.poll,
            poll_interval=w.poll_interval_seconds,
            settle_seconds=w.settle_seconds,
            settle_from_mtime=w.settle_from_mtime,
            rescan_seconds=w.rescan_seconds,
            ignore=[*w.ignore, INBOX_LOCK],
        )

    # -- health -----------------------------------------------------------------------

    def stall_limit(self) -> float:
        dests = self.settings.destinations
        worst = max(
            (d.dimse_timeout + d.network_timeout for d in dests), default=DEFAULT_STALL_SECONDS
        )
        return self.settings.health.stall_seconds or (worst * 2 + STALL_MARGIN_SECONDS)

    def unhealthy(self) -> str | None:
        """Why the daemon is not healthy (for `forwarder health`), or None."""
        return self.trouble.problem() or self.stuck()

    def stuck(self) -> str | None:
        """Why the daemon is hung or broken (for the watchdog), or None.

        An outbox that cannot be written is not among the reasons: the daemon waits for it
        as it should, and a restart by the watchdog would not bring the space back.
        """
        now = time.monotonic()
        if not self.enqueuer.is_alive():
            return "the enqueuer thread died"
        limit = self.stall_limit()
        return next(filter(None, (w.problem(limit, now) for w in self.workers)), None)

    def status_line(self) -> str:
        counts = self.outbox.counts()
        pending = sum(c.get(State.PENDING, 0) for c in counts.values())
        inflight = sum(c.get(State.INFLIGHT, 0) for c in counts.values())
        quarantined = sum(c.get(State.QUARANTINED, 0) for c in counts.values())
        now = time.time()
        paused = [n for n, b in self.breakers.items() if b.remaining(now)]
        infos = self.outbox.destination_info()
        last = max((i.last_success_at or 0 for i in infos.values()), default=0)
        line = (
            f"{pending} queued, {inflight} in flight, {quarantined} quarantined, "
            f"last success {iso(last) if last else 'never'}"
        )
        if paused:
            line += f", paused: {', '.join(paused)}"
        return line

    def _heartbeat(self) -> None:
        workers = self.workers
        info = {
            "version": __version__,
            "workers": len(workers),
            "workers_alive": sum(w.is_alive() for w in workers),
            "unhealthy": self.unhealthy(),
            "config": str(self.config_path) if self.config_path else None,
            "destinations": [d.name for d in self.settings.destinations],
            "stats": self.events.counts(),
        }
        self.outbox.heartbeat(time.time(), info)

    # -- reload -----------------------------------------------------------------------

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_for_daemon(self.config_path)
        except ConfigError as exc:
            for line in exc.lines():
                LOGGER.error(f"reload refused, keeping the running config: {line}")
            self.notifier.ready(self.status_line())
            return
        old = self.settings
        os.umask(new.umask_bits)
        if new.outbox.path != old.outbox.path:
            LOGGER.warning("outbox.path changed: it takes effect at the next restart only")
            new = new.model_copy(update={"outbox": old.outbox})
        old_dests = {d.name: d for d in old.destinations}
        new_dests = {d.name: d for d in new.destinations}
        changed = [n for n in old_dests if old_dests[n] != new_dests.get(n)]
        old_crews = [crew for n in changed if (crew := self.crews.pop(n, None)) is not None]
        contexts = {crew.dest.name: crew.contexts for crew in old_crews}
        retiring = [w for crew in old_crews for w in crew.workers]
        every = min(self.notifier.watchdog_interval() or 1.0, 1.0)
        if not stop_workers(retiring, new.shutdown_timeout, self._keepalive, every):
            # still in a store: it ends on its own; shutdown joins it (or exits forced)
            self._retired += [w for w in retiring if w.is_alive()]
        self.settings = new
        self.enqueuer.intake = Intake.of(new)
        self.disposer.layout = Layout.of(new)
        if (new.outbox, new.watch.paths) != (old.outbox, old.watch.paths):
            self.retention = _retention(self.outbox, new)
            self._prune_at = 0.0  # a retention turned on or shortened applies now
        rules = Rules.of(new)
        for crew in self.crews.values():
            crew.rules = rules
        started = [d for n, d in new_dests.items() if n not in old_dests or n in changed]
        self._start_crews(started, contexts)
        for name in changed:
            if name not in new_dests:
                waiting = sum(
                    n
                    for s, n in self.outbox.counts().get(name, {}).items()
                    if s in (State.PENDING, State.INFLIGHT)
                )
                LOGGER.warning(
                    f"destination {name} removed; {waiting} deliveries to it stay queued "
                    "until it is configured again"
                )
        if new.watch != old.watch and self.watcher is not None:
            self.watcher.stop()
            self.watcher = self._make_watcher()
            self.watcher.start()
        touched = sorted({*changed, *(d.name for d in started)})
        LOGGER.info(
            f"reloaded {self.config_path}: destinations {', '.join(new_dests) or 'none'}"
            + (f"; restarted workers of {', '.join(touched)}" if touched else "")
        )
        self.notifier.ready(self.status_line())

    # -- life cycle -------------------------------------------------------------------

    def _recover_at_start(self) -> None:
        """Queue again what was in flight at the last stop (no worker of ours holds any yet).

        On a full disk this waits for the main loop to try again: until then those rows come
        back when their leases run out, as after a crash.
        """
        try:
            recovered = self.outbox.recover_leases(time.time(), all_inflight=True)
        except OutboxCorruptError:
            raise
        except OutboxError as exc:
            self.trouble.report("start-up", exc)
            return
        self._recovered_at_start = True
        if recovered:
            LOGGER.info(f"{recovered} deliveries were in flight at the last stop; queued again")

    def start(self) -> None:
        self._recover_at_start()
        self.metrics = start_metrics(
            self.settings.metrics.listen,
            self.outbox,
            destinations=lambda: [d.name for d in self.settings.destinations],
            stats=self.events.counts,
        )
        self.enqueuer.start()
        self._start_crews(self.settings.destinations)
        self.watcher = self._make_watcher()
        self.watcher.start()
        roots = ", ".join(str(p) for p in self.settings.watch.paths)
        dests = ", ".join(
            f"{d.name} ({d.called_aet}@{d.host}:{d.port})" for d in self.settings.destinations
        )
        LOGGER.info(f"forwarder {__version__} watching {roots}; sending to {dests}")
        self._tend(self._heartbeat)
        self.notifier.ready(self.status_line())

    def _tend(self, step: Callable[[], object]) -> bool:
        """Run one step of the main loop; an outbox error is reported, not raised. True if ok.

        A damaged outbox stops the daemon (`die`).
        """
        try:
            step()
        except OutboxCorruptError as exc:
            self.damaged("main loop", exc)
        except OutboxError as exc:
            self.trouble.report("main loop", exc)
        except Exception:
            LOGGER.exception("main loop: unexpected error; carrying on")
        else:
            return True
        return False

    def serve(self) -> None:
        """The main loop: heartbeat, status, watchdog, leases, summary, reload; until stop."""
        hb_every = self.settings.health.heartbeat_seconds
        wd_every = self.notifier.watchdog_interval()
        next_hb = next_status = next_summary = next_lease = next_wd = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self._tend(self.reload)
            if self.nudge_requested.is_set():
                self.nudge_requested.clear()
                self.wake_workers()
            self._check_stages()
            if not self._recovered_at_start:
                self._tend(self._recover_at_start)
            if now >= next_hb:
                if self._tend(self._heartbeat):
                    self.trouble.clear()
                next_hb = now + hb_every
            if now >= next_status:
                self._tend(lambda: self.notifier.status(self.status_line()))
                next_status = now + STATUS_SECONDS
            if wd_every is not None and now >= next_wd:
                problem = self.stuck()
                if problem is None:
                    self.notifier.watchdog()
                else:
                    LOGGER.error(f"not pinging the watchdog: {problem}")
                next_wd = now + wd_every
            if now >= next_lease:
                self._tend(self._recover_leases)
                lease = self.settings.outbox.lease_seconds
                next_lease = now + max(lease / 4, MIN_LEASE_CHECK_SECONDS)
            if now >= next_summary:
                if next_summary:
                    self._tend(lambda: LOGGER.info(f"summary: {self.status_line()}"))
                next_summary = now + self.settings.log.summary_seconds
            self._tend(lambda: self.disposer.loop(time.monotonic()))
            if now >= self._prune_at:
                self._prune_at = now + self._prune()
            deadlines = [next_hb, next_status, next_summary, next_lease, self._prune_at]
            if wd_every is not None:
                deadlines.append(next_wd)
            self.wakeup.wait(max(MIN_WAKE_SECONDS, min(deadlines) - time.monotonic()))
            self.wakeup.clear()

    def _prune(self) -> float:
        """One retention step (its clock is the outbox's); seconds until the next one."""
        delays = [PRUNE_AFTER_ERROR_SECONDS]
        self._tend(lambda: delays.append(self.retention.loop(time.time())))
        return delays[-1]

    def _recover_leases(self) -> None:
        n = self.outbox.recover_leases(time.time())
        if n:
            LOGGER.warning(f"{n} deliveries outlived their lease; queued again")
            self.wake_workers()

    def _check_stages(self) -> None:
        """A stage thread that ended while we are not stopping makes the daemon exit non-zero."""
        if self.stopping.is_set():
            return
        if not self.enqueuer.is_alive():
            self.die("the enqueuer thread died", EX_SOFTWARE)
        for w in self.workers:
            if not w.is_alive() and not w.stop.is_set():
                self.die(f"worker {w.name} died", EX_SOFTWARE)

    def shutdown(self) -> bool:
        """Stop watching, finish the in-flight stores, release, close. True if clean."""
        self.notifier.stopping()
        LOGGER.info("stopping: finishing in-flight stores")
        deadline = time.monotonic() + self.settings.shutdown_timeout
        if self.watcher is not None:
            self.watcher.stop()
        self.enqueuer.halt()  # the sentinel wakes it at once
        self.enqueuer.join(max(0.0, deadline - time.monotonic()))
        left = max(0.0, deadline - time.monotonic())
        clean = stop_workers([*self.workers, *self._retired], left)
        if not clean:
            LOGGER.warning("in-flight stores did not finish in time; they will be sent again")
            self.hard_stop.set()
        self.metrics.close()
        try:
            with contextlib.suppress(OutboxError):
                self.outbox.heartbeat(time.time(), {"version": __version__, "stopped": True})
        finally:
            if clean:
                self.outbox.close()
        LOGGER.info("stopped" if clean else "stopped (forced)")
        return clean


def _retention(outbox: Outbox, settings: Settings) -> Retention:
    # a file still in a watched folder keeps its rows: pruned, a restart would send it again
    return Retention(outbox, settings.outbox.keep_sent_seconds, still_in(settings.watch.paths))
