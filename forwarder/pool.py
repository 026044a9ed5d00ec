"""Send one set of files over parallel associations that all finish together.

Each association's thread takes the next file from one shared queue as soon as its last store
is answered, so no association idles while another still has a backlog (handing out chunks
left one association carrying a third of the set at the end). How many associations run is
decided by ``forwarder.concurrency.Autoscale``: a fixed number, or "auto". An extra
association is opened beside the ones already sending, never in front of them: a peer that
makes it wait (a single-process storescp queues the second connection until the first is
released) or refuses it costs nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from forwarder.association import AssociationFailed, Peer
from forwarder.concurrency import Autoscale
from forwarder.contexts import ContextSpec, split_by_contexts
from forwarder.dicomfile import DicomInfo
from forwarder.logs import one_line
from forwarder.sender import Sender, StoreResult
from forwarder.status import Action, Classification

__all__ = ["Outcome", "send_all"]

LOGGER = logging.getLogger("forwarder.pool")

Outcome = StoreResult | AssociationFailed
"""What became of one file: its store result, or why no association could carry it."""

_POLL = 0.05  # how often the starter looks whether another association is wanted
_BUSY_TRIES = 3  # a peer rejecting as busy every association at once is asked this often
_BUSY_WAIT = 0.2  # seconds between those tries


class _Group:
    """The files of one context group and the associations sending them."""

    def __init__(
        self,
        peer: Peer,
        specs: Sequence[ContextSpec],
        todo: Sequence[DicomInfo],
        scale: Autoscale,
        restrict: str | None,
        done: Callable[[DicomInfo, Outcome], None],
    ) -> None:
        self.peer, self.specs, self.scale, self.restrict = peer, specs, scale, restrict
        self.todo: deque[DicomInfo] = deque(todo)
        self.done = done
        self.lock = threading.Lock()
        self.sending = 0  # associations established and taking files
        self.active = 0  # threads opening or sending
        self.changed = threading.Event()
        self.finished = threading.Event()  # cancels an extra association still being opened

    def take(self, level: int) -> DicomInfo | None:
        with self.lock:
            if level > self.scale.allowed or not self.todo:
                return None
            return self.todo.popleft()

    def work(self, level: int) -> None:
        """One association's thread; `level` is its rank (1 = the first association).

        An association that cannot be opened, or is lost and cannot be re-opened, while
        another one of the set is open or opening gives its file back and leaves: the peer
        takes fewer associations than asked ("auto" settles there). The last one to go fails
        every file not yet sent with the reason; nothing is reported twice or not at all.
        """
        holding: list[DicomInfo] = []  # the file taken and not yet reported
        failure: AssociationFailed | None = None
        with self.lock:
            self.active += 1
        try:
            for attempt in range(_BUSY_TRIES):
                failure = self._work(level, holding)
                if failure is None or not failure.busy or attempt == _BUSY_TRIES - 1:
                    break
                with self.lock:  # requests at once can all exceed a peer's limit: once
                    alone = self.active == 1  # the others are gone, this one tries again
                    if alone:
                        self.todo.extendleft(reversed(holding))
                        holding.clear()
                if not alone or self.finished.wait(_BUSY_WAIT):
                    break
        except Exception as exc:  # a bug: reported for the file at hand, the rest go on
            LOGGER.exception(f"sending to {self.peer.label}: unexpected error")
            failure = AssociationFailed(
                Classification(Action.PERMANENT, f"internal error: {one_line(exc)}")
            )
        finally:
            with self.lock:
                self.active -= 1
                alone = self.active == 0
                rest: list[DicomInfo] = []
                if failure is not None:
                    if alone:
                        rest = holding + list(self.todo)
                        self.todo.clear()
                    else:
                        self.todo.extendleft(reversed(holding))
                    sending = self.sending
            if failure is not None:
                self._gave_up(level, failure, alone, sending, rest)
            self.changed.set()

    def _gave_up(
        self,
        level: int,
        failure: AssociationFailed,
        alone: bool,
        sending: int,
        rest: list[DicomInfo],
    ) -> None:
        meaning = failure.classification.meaning
        if not alone:
            self.scale.limit(max(1, sending), time.monotonic())
            LOGGER.info(
                f"{self.peer.label}: association {level} not available ({meaning}); "
                f"going on with {max(1, sending)}"
            )
            return
        if self.finished.is_set() and not rest:
            return  # an extra association cancelled at the end: nothing was waiting for it
        LOGGER.error(f"Association with {self.peer.label} failed: {meaning}")
        for info in rest:
            self.done(info, failure)

    def _work(self, level: int, holding: list[DicomInfo]) -> AssociationFailed | None:
        with Sender(self.peer, restrict=self.restrict, stop=self.finished) as sender:
            try:
                rtt = sender.open(self.specs)
            except AssociationFailed as exc:
                return exc
            if level == 1:
                self.scale.round_trip(rtt)
            with self.lock:
                self.sending += 1
            first = True
            try:
                while (info := self.take(level)) is not None:
                    holding.append(info)
                    try:
                        for result in sender.send_with(self.specs, [info]):
                            holding.clear()
                            self.done(info, result)
                            if result.classification.status is None:
                                continue
                            if first:  # measure from the first answer on (TCP warmed up)
                                self.scale.established(level, time.monotonic())
                                first = False
                            else:
                                self.scale.stored(time.monotonic())
                    except AssociationFailed as exc:
                        return exc  # lost and not re-opened
            finally:
                with self.lock:
                    self.sending -= 1
        return None

    def run(self) -> None:
        threads: list[threading.Thread] = []

        def start() -> None:
            level = len(threads) + 1
            t = threading.Thread(target=self.work, args=(level,), name=f"send-{level}")
            threads.append(t)
            t.start()

        start()
        while not self.scale.auto and len(threads) < min(self.scale.allowed, len(self.todo)):
            start()  # a fixed number: all at once
        while True:
            self.changed.wait(_POLL)
            self.changed.clear()
            alive = [t for t in threads if t.is_alive()]
            with self.lock:
                more = bool(self.todo) and self.sending > 0
                if not self.todo and self.sending == 0:
                    self.finished.set()
            if more and self.scale.allowed > len(threads) and len(alive) == len(threads):
                start()  # "auto": one more at a time
            elif not alive:
                break
        for t in threads:
            t.join()
        if self.todo:  # the last sender left as an extra one was refused: carry on here
            self.finished.clear()
            self.work(1)


def send_all(
    peer: Peer,
    infos: Sequence[DicomInfo],
    restrict: str | None,
    scale: Autoscale,
    done: Callable[[DicomInfo, Outcome], None],
) -> None:
    """Send `infos`, calling `done` once per file (from the sending threads) with its outcome.

    Files are grouped by the presentation contexts they need (at most 128 per association);
    the groups go one after another, each over up to ``scale.allowed`` associations.
    """
    pairs = [(i.sop_class_uid, i.transfer_syntax) for i in infos]
    for specs in split_by_contexts(pairs, restrict):
        classes = {s.sop_class for s in specs}
        todo = [i for i in infos if i.sop_class_uid in classes]
        _Group(peer, specs, todo, scale, restrict, done).run()
