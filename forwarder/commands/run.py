"""``forwarder run``: the daemon as a process: config, logging, folders, locks, signals."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from forwarder.config import EX_CONFIG, ConfigError, Settings, add_config_argument
from forwarder.daemon import INBOX_LOCK, Daemon
from forwarder.errors import EX_CANTCREAT, EX_TEMPFAIL
from forwarder.health import disk_full
from forwarder.lockfile import Held, LockedError, LockError, hold
from forwarder.logs import setup_logging
from forwarder.notify import Notifier
from forwarder.outbox import OutboxCorruptError, OutboxError, OutboxFullError
from forwarder.preflight import load_for_daemon
from forwarder.trouble import OutboxTrouble
from forwarder.watcher import WatchRootError

__all__ = ["add_arguments", "main", "run"]

LOGGER = logging.getLogger("forwarder.daemon")

FULL_DISK_POLL_SECONDS = 2.0
"""Between tries to open the outbox on a full disk."""
START_TIMEOUT_MARGIN_SECONDS = 30.0
"""Asked of systemd on top of the poll while waiting for space (EXTEND_TIMEOUT_USEC)."""
SWITCH_INTERVAL = 0.0005
"""The GIL switch interval while running (see `run`)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--log-target", choices=["auto", "stderr", "journal"], help="override log.target"
    )
    parser.add_argument("--log-format", choices=["text", "json"], help="override log.format")
    parser.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="override log.level",
    )


def _install_signals(daemon: Daemon) -> None:
    """Handlers only record the signal (no lock: see `Wakeup`): the first SIGTERM/SIGINT stops
    cleanly, a second exits at once."""
    stops = 0

    def on_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stops
        stops += 1
        if stops > 1:
            os.write(2, b"second signal: exiting now (in-flight stores will be resent)\n")
            os._exit(128 + signum)
        daemon.wakeup.signal(signum)

    def on_other(signum: int, frame: FrameType | None) -> None:
        daemon.wakeup.signal(signum)  # SIGHUP: reload; SIGUSR1: an operator changed the outbox

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_other)
    signal.signal(signal.SIGUSR1, on_other)


def _prepare_dirs(settings: Settings) -> list[str]:
    errors = []
    wanted = [(p, "watch.paths") for p in settings.watch.paths]
    wanted.append((settings.quarantine.dir, "quarantine.dir"))
    wanted.append((settings.outbox.path.parent, "outbox.path"))
    if settings.disposition.on_success == "move":
        wanted.append((settings.disposition.archive_dir, "disposition.archive_dir"))
    for path, name in wanted:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            errors.append(f"{name}: cannot create {path}: {exc.strerror}")
    return errors


def _outbox_lock_path(settings: Settings) -> Path:
    path = settings.outbox.path
    return path.with_name(path.name + ".lock")


def _take_locks(settings: Settings) -> list[Held] | int:
    """Lock the outbox and every watched folder for this daemon's life.

    Two daemons on one outbox would take each other's in-flight deliveries back at start-up,
    and two on one inbox would send every file twice. Returns the locks held, or the exit
    status after logging who holds one. Operator commands take no lock: they only read the
    outbox, or change it in short transactions.
    """
    held: list[Held] = []
    wanted = [("outbox", settings.outbox.path, _outbox_lock_path(settings))]
    wanted += [("inbox", root, root / INBOX_LOCK) for root in settings.watch.paths]
    for what, path, lock in wanted:
        status = None
        try:
            held.append(hold(lock))
        except LockedError as exc:
            holder = f"pid {exc.pid}" if exc.pid is not None else "another process"
            LOGGER.error(
                f"{what} {path} is in use by {holder} (lock {lock}): another forwarder runs "
                "on it; stop that one first"
            )
            status = EX_TEMPFAIL
        except LockError as exc:
            if what == "outbox":
                LOGGER.error(f"outbox.path: {exc}")
                status = EX_CANTCREAT
            else:  # a read-only inbox (disposition keep) still works, just unguarded
                LOGGER.warning(f"watch.paths: {exc}; a second daemon on {path} would go unseen")
        if status is not None:
            for h in held:
                h.release()
            return status
    return held


def _damaged(settings: Settings, config: Path | None, problem: str) -> None:
    cfg = f" --config {config}" if config else ""
    LOGGER.error(
        f"outbox.path: {settings.outbox.path} is damaged ({problem}); not starting. "
        f"Run `forwarder outbox check{cfg}` and restore the outbox from a backup"
    )


def _open_daemon(settings: Settings, config: Path | None) -> Daemon | int:
    """The daemon on a sound, writable outbox, or the exit status after logging why not.

    On a full disk SQLite cannot even create the outbox's WAL files: wait for space (logged
    once a minute) instead of exiting, as a running daemon would.
    """
    trouble = OutboxTrouble()
    # under systemd: say why, and keep the start from timing out
    with Notifier() as waiting:
        while True:
            try:
                daemon = Daemon(settings, config)
            except OutboxCorruptError as exc:
                _damaged(settings, config, str(exc))
                return EX_CANTCREAT
            except OutboxError as exc:
                if disk_full(settings.outbox.path) is None:
                    LOGGER.error(f"outbox.path: cannot open {settings.outbox.path}: {exc}")
                    return EX_CANTCREAT
                full = disk_full(settings.outbox.path)
                trouble.report("start-up", OutboxFullError(f"{exc}; {full}"))
                timeout = FULL_DISK_POLL_SECONDS + START_TIMEOUT_MARGIN_SECONDS
                waiting.send(
                    STATUS=f"waiting for space: {full}", EXTEND_TIMEOUT_USEC=int(timeout * 1e6)
                )
                time.sleep(FULL_DISK_POLL_SECONDS)
                continue
            break
    trouble.clear()
    try:
        problems = daemon.outbox.integrity_check(quick=True)
    except OutboxError as exc:
        problems = [str(exc)]
    if problems:
        _damaged(settings, config, " ".join("; ".join(problems[:3]).split()))
        daemon.outbox.close()
        return EX_CANTCREAT
    return daemon


def run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status."""
    # A worker waiting for a C-STORE response gets the GIL back only when the running
    # thread yields it: every switch interval (5 ms by default) while the enqueuer or the
    # watcher is busy. At hundreds of stores a second that wait is the bottleneck.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        settings = load_for_daemon(args.config)
    except ConfigError as exc:
        exc.report("forwarder")
        return EX_CONFIG
    # Before anything is created: outside systemd (UMask=) the caller's umask, often 022,
    # would leave the outbox, the sidecars and copied files readable by every local user.
    os.umask(settings.umask_bits)
    log = settings.log
    setup_logging(
        args.log_level or log.level, args.log_format or log.format, args.log_target or log.target
    )
    errors = _prepare_dirs(settings)
    for line in errors:
        LOGGER.error(line)
    if errors:
        return EX_CANTCREAT
    locks = _take_locks(settings)
    if isinstance(locks, int):
        return locks
    try:
        return _run_locked(args, settings)
    finally:
        for lock in locks:
            lock.release()


def _run_locked(args: argparse.Namespace, settings: Settings) -> int:
    daemon = _open_daemon(settings, args.config)
    if isinstance(daemon, int):
        return daemon
    _install_signals(daemon)
    try:
        daemon.start()
    except WatchRootError as exc:
        LOGGER.error(f"watch.paths: {exc}")
        daemon.stopping.set()
        daemon.shutdown()
        return EX_CANTCREAT
    except ConfigError as exc:
        for line in exc.lines():
            LOGGER.error(line)
        daemon.stopping.set()
        daemon.shutdown()
        return EX_CONFIG
    try:
        daemon.serve()
    finally:
        clean = daemon.shutdown()
    if not clean:
        # A worker may wait on a wedged peer until its timeouts: leave now. The outbox is as
        # safe as after kill -9 and the in-flight deliveries are sent again.
        logging.shutdown()
        os._exit(daemon.exit_status or 1)
    return daemon.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forwarder run")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
