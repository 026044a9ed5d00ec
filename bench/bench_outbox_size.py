"""Outbox file size over weeks of deliveries, with retention (`Retention.loop`) and without.

A simulated clock drives a real outbox: `--per-day` files a day (50,000) for `--days` days
(20), queued with ``enqueue_many``, claimed and marked sent in batches (``claim`` /
``mark_many``) spread over each day, as the enqueuer and the workers do. Between batches,
`forwarder.retention.Retention.loop` runs whenever the delay it asked for has passed, as the
daemon's main loop calls it. Rows look like real ones (inbox paths and UIDs of real lengths).
At the end of each simulated day the size of the outbox file and of its WAL is printed, once
with `--keep-days` (1) and once with retention off (``keep_sent_days = 0``).

Usage: ``python bench/bench_outbox_size.py [--days 20] [--per-day 50000] [--keep-days 1]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from forwarder.dicomfile import DicomInfo  # noqa: E402
from forwarder.outbox import Mark, Outbox, State  # noqa: E402
from forwarder.retention import Retention  # noqa: E402

DAY = 86400.0
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
BATCH = 500  # files per enqueue, and rows per claim / mark_many
MB = 1024 * 1024
ORG = "1.2.826.0.1.3680043.10.543"  # a UID root of a typical length


def files(day: int, start: int, n: int) -> list[DicomInfo]:
    """`n` files of `day` as the enqueuer sees them: nested inbox paths, 50-60 char UIDs."""
    out = []
    for i in range(start, start + n):
        study = f"{ORG}.{day}.{i // 200}.20260101{i % 97:04d}"
        out.append(
            DicomInfo(
                path=Path(f"/var/spool/forwarder/inbox/modality-{i % 7}/{study}/CT.{i:06d}.dcm"),
                size=526_000 + i % 1000,
                mtime_ns=int((T0 + day * DAY) * 1e9) + i,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                sop_instance_uid=f"{ORG}.{day}.{i}.{1_700_000_000_000 + i}.{i % 13}",
                transfer_syntax="1.2.840.10008.1.2.1",
                study_uid=study,
                dataset_offset=336,
            )
        )
    return out


def sizes(path: Path) -> tuple[float, float]:
    """The outbox file and its WAL, in MB."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size / MB, (wal.stat().st_size if wal.exists() else 0) / MB


def run(path: Path, days: int, per_day: int, keep_days: float) -> list[tuple[int, int, float]]:
    """Simulate `days` days; print and return (day, rows, file MB) at the end of each."""
    label = f"keep_sent_days = {keep_days:g}"
    print(f"\n{label}: {days} days x {per_day:,} deliveries", flush=True)
    print(f"{'day':>4} {'rows':>10} {'file MB':>9} {'wal MB':>7} {'wall s':>7}")
    result = []
    started = time.monotonic()
    with Outbox(path) as ob:
        retention = Retention(ob, keep_days * DAY)
        due = T0  # when retention wants to run next
        step = DAY * BATCH / per_day  # simulated time between two batches
        for day in range(days):
            for start in range(0, per_day, BATCH):
                now = T0 + day * DAY + start / per_day * DAY
                ob.enqueue_many(files(day, start, min(BATCH, per_day - start)), ["pacs"], now)
                claimed = ob.claim("pacs", BATCH, now, 300.0)
                ob.mark_many([Mark(d.id, State.SENT, 0, sent_as="as is") for d in claimed], now)
                while retention.enabled and due <= now + step:
                    due = max(due, now) + retention.loop(max(due, now))
            rows = sum(sum(c.values()) for c in ob.counts().values())
            file_mb, wal_mb = sizes(path)
            print(
                f"{day + 1:>4} {rows:>10,} {file_mb:>9.1f} {wal_mb:>7.1f} "
                f"{time.monotonic() - started:>7.0f}",
                flush=True,
            )
            result.append((day + 1, rows, file_mb))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=20)
    parser.add_argument("--per-day", type=int, default=50_000)
    parser.add_argument("--keep-days", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, help="where the outboxes go (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        kept = run(Path(tmp) / "kept.sqlite3", args.days, args.per_day, args.keep_days)
        forever = run(Path(tmp) / "forever.sqlite3", args.days, args.per_day, 0)
    total = args.days * args.per_day
    peak = max(mb for _, _, mb in kept)
    print(
        f"\n{total:,} deliveries: with keep_sent_days = {args.keep_days:g} the file peaks at "
        f"{peak:.1f} MB and ends at {kept[-1][2]:.1f} MB ({kept[-1][1]:,} rows); with "
        f"keep_sent_days = 0 it ends at {forever[-1][2]:.1f} MB ({forever[-1][1]:,} rows), "
        f"{forever[-1][2] * MB / max(forever[-1][1], 1):.0f} bytes per row"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
