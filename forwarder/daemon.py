"""The daemon: wires the stages (watch -> enqueue -> deliver -> dispose) and runs their life."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from forwarder import __version__
from forwarder.breaker import Breaker
from forwarder.config import ConfigError, Destination, Settings
from forwarder.contexts import ContextSpec
from forwarder.crew import Crew, Rules, stop_workers
from forwarder.deliver import Worker
from forwarder.dispose import Disposer, Layout
from forwarder.enqueue import Enqueuer, Intake
from forwarder.errors import EX_CANTCREAT, EX_SOFTWARE
from forwarder.events import Events
from forwarder.health import stall_limit, status_line
from forwarder.inodes import InodeIndex
from forwarder.logs import fields
from forwarder.metrics import NO_METRICS, Metrics, start_metrics
from forwarder.notify import Notifier
from forwarder.outbox import Outbox, OutboxCorruptError, OutboxError, State
from forwarder.preflight import check_layout, check_receive, load_for_daemon
from forwarder.receiver import Receiver
from forwarder.transforming import Transforms
from forwarder.trouble import OutboxTrouble, damaged
from forwarder.upkeep import Upkeep
from forwarder.wakeup import Wakeup
from forwarder.watcher import Watcher

__all__ = ["INBOX_LOCK", "Daemon"]

LOGGER = logging.getLogger("forwarder.daemon")

INBOX_LOCK = ".forwarder.lock"
"""The lock file in each watched folder; the watcher always ignores it."""
STATUS_SECONDS = 5.0
"""How often the status line goes to systemd (`systemctl status`)."""
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
        self.wakeup = Wakeup()  # signal handlers and stages wake the main loop through it
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
        self.upkeep = Upkeep(
            self.outbox,
            settings.outbox.lease_seconds,
            settings.outbox.keep_sent_seconds,
            _kept_in(settings),
            requeued=self.wake_workers,
            held=self._held,
        )
        self.receiver: Receiver | None = None
        self.transforms = Transforms()
        self.watcher: Watcher | None = None
        self.crews: dict[str, Crew] = {}
        self.breakers: dict[str, Breaker] = {}  # kept across reloads, as the outbox keeps them
        self._retired: list[Worker] = []  # stopped by a reload while still in a store
        self._unstarted_left = 0  # acknowledged instances a receiver that could not start left

    @property
    def workers(self) -> list[Worker]:
        return [w for crew in self.crews.values() for w in crew.workers]

    def _held(self) -> list[int]:
        """The rows the live workers (retiring ones too) are sending now."""
        return [i for w in [*self.workers, *self._retired] if w.is_alive() for i in w.held]

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
                worker = self._hire(crew, n)
                crew.workers.append(worker)
                worker.start()

    def _hire(self, crew: Crew, index: int) -> Worker:
        return Worker(
            crew,
            index,
            outbox=self.outbox,
            events=self.events,
            metrics=self.metrics,
            trouble=self.trouble,
            done=self.disposer.done,
            fatal=self.die,
            hard_stop=self.hard_stop,
            sender=self.transforms.sender,
        )

    def _start_receiver(self) -> None:
        """Start the receiver when ``[receive]`` has `listen`; a failure to start it (address
        in use, folder not writable, outbox unreadable for its sweep) is logged and the
        daemon goes on without it (the watched folders still work); a reload tries again."""
        if not self.settings.receive.enabled:
            return
        receiver = Receiver(
            self.settings.receive,
            self.outbox,
            self.disposer,
            self.enqueuer.intake,
            queued=self.wake_workers,
            damaged=self.damaged,
            metrics=self.metrics,
            retry=self.settings.retry,
        )
        try:
            receiver.start()
        except OutboxCorruptError as exc:
            self.damaged("receiver", exc)
            return
        except (OSError, OutboxError) as exc:
            self._unstarted_left = receiver.stop()
            LOGGER.error(
                f"receive: cannot start the receiver on {self.settings.receive.listen}: "
                f"{exc}; not receiving (a reload tries again)"
            )
            return
        self.receiver = receiver

    def _stop_receiver(self) -> int:
        """Stop the receiver; how many acknowledged instances it left in its ack log (or the
        one that could not start left: it queues them before it listens)."""
        left, self._unstarted_left = self._unstarted_left, 0
        if self.receiver is not None:
            left = self.receiver.stop()
            self.receiver = None
        return left

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

    def unhealthy(self) -> str | None:
        """Why the daemon is not healthy (for `forwarder health`), or None."""
        return self.trouble.problem() or self.stuck() or self._not_receiving()

    def _not_receiving(self) -> str | None:
        """Why `[receive]` is set but nothing listens (a failed start), or None."""
        rcv = self.settings.receive
        if rcv.enabled and self.receiver is None:
            return f"the receiver is not listening on {rcv.listen} (see the log; SIGHUP retries)"
        return None

    def stuck(self) -> str | None:
        """Why the daemon is hung or broken (for the watchdog), or None.

        An outbox that cannot be written is not among the reasons: the daemon waits for it
        as it should, and a restart by the watchdog would not bring the space back.
        """
        now = time.monotonic()
        if not self.enqueuer.is_alive():
            return "the enqueuer thread died"
        limit = stall_limit(self.settings)
        return next(filter(None, (w.problem(limit, now) for w in self.workers)), None)

    def status_line(self) -> str:
        now = time.time()
        return status_line(self.outbox, [n for n, b in self.breakers.items() if b.remaining(now)])

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
        if self.receiver is not None:
            info["receiver"] = self.receiver.snapshot(time.time())
        self.outbox.heartbeat(time.time(), info)

    # -- reload -----------------------------------------------------------------------

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_for_daemon(self.config_path)
            self.transforms.configure(new)
        except ConfigError as exc:
            for line in exc.lines():
                LOGGER.error(f"reload refused, keeping the running config: {line}")
            self.notifier.ready(self.status_line())
            return
        old = self.settings
        if new.outbox.path != old.outbox.path:
            LOGGER.warning("outbox.path changed: it takes effect at the next restart only")
            new = new.model_copy(update={"outbox": old.outbox})
        receive_changed = new.receive != old.receive
        if receive_changed:
            # stopped first: what it leaves in its ack log decides which [receive] applies
            left = self._stop_receiver()
            if left and (not new.receive.enabled or new.receive.dir != old.receive.dir):
                # they are queued by a receiver on that ack log only: keep it until they are
                LOGGER.error(
                    f"receive: reload keeps the running [receive]: {left} acknowledged "
                    f"instance(s) in {old.receive.dir} are not queued yet, and no receiver "
                    "would look there again; reload once they are (forwarder status shows "
                    "them)"
                )
                new = new.model_copy(update={"receive": old.receive})
                errors = check_layout(new) + check_receive(new)
                if errors:  # the new folders clash with the kept receive.dir
                    for line in errors:
                        LOGGER.error(f"reload refused, keeping the running config: {line}")
                    self._start_receiver()
                    self.notifier.ready(self.status_line())
                    return
        os.umask(new.umask_bits)  # not before: a refused reload leaves the running one
        old_dests = {d.name: d for d in old.destinations}
        new_dests = {d.name: d for d in new.destinations}
        changed = [n for n in old_dests if _sending(old_dests[n]) != _sending(new_dests.get(n))]
        for name in old_dests.keys() - changed:  # the same peer; its rules may differ: the
            self.crews[name].dest = new_dests[name]  # enqueuer applies them, workers go on
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
        if (new.outbox, _kept_in(new)) != (old.outbox, _kept_in(old)):
            out = new.outbox
            self.upkeep.configure(out.lease_seconds, out.keep_sent_seconds, _kept_in(new))
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
        if self.receiver is not None:
            self.receiver.intake = self.enqueuer.intake
            self.receiver.retry = new.retry
        if receive_changed:
            self._start_receiver()
        touched = sorted({*changed, *(d.name for d in started)})
        LOGGER.info(
            f"reloaded {self.config_path}: destinations {', '.join(new_dests) or 'none'}"
            + (f"; restarted workers of {', '.join(touched)}" if touched else "")
        )
        self.notifier.ready(self.status_line())

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the stages.

        Raises
        ------
        ConfigError
            The de-identification key cannot be read or created.
        WatchRootError
            A watched folder cannot be watched.
        """
        self.transforms.configure(self.settings)
        try:
            self.upkeep.recover_at_start(time.time())
        except OutboxCorruptError:
            raise
        except OutboxError as exc:  # a full disk: the main loop tries again
            self.trouble.report("start-up", exc)
        self.metrics = start_metrics(
            self.settings.metrics.listen,
            self.outbox,
            destinations=lambda: [d.name for d in self.settings.destinations],
            stats=self.events.counts,
        )
        self.enqueuer.start()
        # before the workers: a peer reporting on Storage Commitment finds it listening
        self._start_receiver()
        self._start_crews(self.settings.destinations)
        self.watcher = self._make_watcher()
        self.watcher.start()
        roots = ", ".join(str(p) for p in self.settings.watch.paths)
        dests = ", ".join(f"{d.name} ({d.address})" for d in self.settings.destinations)
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
        next_hb = next_status = next_summary = next_wd = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            self._handle_signals()
            if self.stopping.is_set():
                break
            self._check_stages()
            if now >= self.upkeep.next_at:
                self._tend(lambda: self.upkeep.loop(time.monotonic(), time.time()))
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
            if now >= next_summary:
                if next_summary:
                    self._tend(lambda: LOGGER.info(f"summary: {self.status_line()}"))
                next_summary = now + self.settings.log.summary_seconds
            self._tend(lambda: self.disposer.loop(time.monotonic()))
            deadlines = [next_hb, next_status, next_summary, self.upkeep.next_at]
            if wd_every is not None:
                deadlines.append(next_wd)
            self.wakeup.wait(max(MIN_WAKE_SECONDS, min(deadlines) - time.monotonic()))

    def _handle_signals(self) -> None:
        """What the signal handlers recorded: SIGTERM/SIGINT stop, SIGHUP reloads the config,
        SIGUSR1 (an operator command changed the outbox) wakes the workers."""
        while self.wakeup.signals:
            signum = self.wakeup.signals.popleft()
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stopping.set()
            elif signum == signal.SIGHUP:
                self._tend(self.reload)
            elif signum == signal.SIGUSR1:
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
        self._stop_receiver()
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
        self.transforms.shutdown(wait=clean)
        try:
            with contextlib.suppress(OutboxError):
                self.outbox.heartbeat(time.time(), {"version": __version__, "stopped": True})
        finally:
            if clean:
                self.outbox.close()
        LOGGER.info("stopped" if clean else "stopped (forced)")
        return clean


def _kept_in(settings: Settings) -> list[Path]:
    """The folders whose files keep their outbox rows past retention while still there."""
    folders = list(settings.watch.paths)
    if settings.receive.enabled:
        folders.append(settings.receive.dir)
    return folders


def _sending(dest: Destination | None) -> Destination | None:
    """What a destination's workers use: all of it but the routing rules (`match`,
    `exclude`), which the enqueuer applies. A change in it restarts the destination's crew."""
    return None if dest is None else dest.model_copy(update={"match": {}, "exclude": {}})
