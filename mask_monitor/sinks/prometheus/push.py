"""Pushgateway pushes off the training thread: one worker, a queue of one where the latest state wins.

A push is an HTTP PUT of the whole registry; a gateway that is slow, down or a black hole (accepts TCP,
never answers) would block whoever pushes for the full timeout. So the training thread only *asks* for a
push (:meth:`PushWorker.request`, a few microseconds, never blocks on the network) and one background
thread pushes, rendering the registry when it starts a push, so it always sends the newest values. While a
push is in flight, newer requests replace each other: at most one waits, and each replaced one is counted
as *skipped* (its values are in the newer push anyway).

Failures are reported at WARNING: the first at once, then at most once per ``warn_interval`` with how many
pushes failed and how many were skipped, and a line at INFO when pushes succeed again. At the end of
training (or an abort) :meth:`PushWorker.flush` asks for a final push and waits for it at most
``timeout`` seconds; if it does not complete, one WARNING says so with the counts. :meth:`close` never waits
for the network: a push stuck in a black hole ends by its own timeout in the (daemon) worker thread.

Example:
    >>> pushed = []
    >>> worker = PushWorker(lambda: pushed.append(1), "http://gateway:9091", timeout=1.0)
    >>> worker.flush(timeout=1.0)  # request a push and wait for it
    True
    >>> worker.close(); worker.counts["requested"] == worker.counts["pushed"] == len(pushed) == 1
    True
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["PushWorker"]

logger = logging.getLogger("mask_monitor")


class PushWorker:
    """Runs ``push()`` in a background thread on request; see the module docstring.

    Args:
        push: the blocking push (it must give up after ``timeout`` seconds by itself).
        url: the gateway, for messages.
        timeout: the push timeout, for messages, and the default bound of :meth:`flush`.
        warn_interval: seconds between two warnings about failing pushes.
    """

    def __init__(self, push: Callable[[], None], url: str, timeout: float, warn_interval: float = 60.0) -> None:
        self._push = push
        self.url = url
        self.timeout = float(timeout)
        self.warn_interval = float(warn_interval)
        self._cond = threading.Condition()
        self._pending = False
        self._requested = 0  # sequence number of the newest request
        self._done = 0  # the newest request whose push has finished (pushed or failed)
        self._in_flight = False
        self._last_ok = True
        self._stop = False
        self._failing = False
        self._last_warning = -float("inf")
        self._last_error: BaseException | None = None
        #: requested == pushed + failed + skipped + (one pending) + (one in flight)
        self.counts: dict[str, int] = {"requested": 0, "pushed": 0, "failed": 0, "skipped": 0}
        self._thread = threading.Thread(target=self._run, name="mask-monitor-push", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training thread side

    def request(self) -> int:
        """Ask for a push of the values as they will be when it starts; never blocks. Returns its number."""
        with self._cond:
            if self._stop:
                return self._requested
            if self._pending:
                self.counts["skipped"] += 1  # the waiting request is superseded by this newer one
            self._pending = True
            self._requested += 1
            self.counts["requested"] += 1
            self._cond.notify_all()
            return self._requested

    def flush(self, timeout: float | None = None, *, what: str = "final") -> bool:
        """Push the current values and wait for that push, at most ``timeout`` (default: the push timeout).
        True when it was pushed; otherwise one WARNING with the counts."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return self.wait(self.request(), deadline, what=what)

    def wait(self, wanted: int, deadline: float, *, what: str = "final") -> bool:
        """Wait until push request number ``wanted`` (from :meth:`request`) is done, at most until
        ``deadline`` (``time.monotonic()``). True when it was pushed; otherwise one WARNING with the counts."""
        with self._cond:
            while self._done < wanted and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            done = self._done >= wanted
            ok = done and self._last_ok
            counts = dict(self.counts)
            unfinished = int(self._pending) + int(self._in_flight)
        if not ok:
            outcome = (
                f"failed ({_describe(self._last_error)})"
                if done and self._last_error is not None
                else f"did not complete within the push timeout ({self.timeout:g} s)"
            )
            logger.warning(
                "mask-monitor: the %s push to the Pushgateway at %s %s; of %d pushes asked for in this run, %d "
                "were pushed, %d failed, %d were skipped (replaced by a newer one before they were sent) and %d "
                "are unfinished: the gateway may lack this run's last values",
                what, self.url, outcome,
                counts["requested"], counts["pushed"], counts["failed"], counts["skipped"], unfinished,
            )  # fmt: skip
        return ok

    def close(self, timeout: float = 0.2) -> None:
        """Stop the worker; never waits for the network (a stuck push ends by its own timeout)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                self._pending = False
                self._in_flight = True
                seq = self._requested
            error: BaseException | None = None
            try:
                self._push()
            except Exception as exc:  # noqa: BLE001 - a gateway that is down must not stop training
                error = exc
            with self._cond:
                self._in_flight = False
                self._done = seq
                self._last_ok = error is None
                self.counts["pushed" if error is None else "failed"] += 1
                counts = dict(self.counts)
                self._cond.notify_all()
            self._report(error, counts)

    def _report(self, error: BaseException | None, counts: dict[str, int]) -> None:
        if error is None:
            if self._failing:
                self._failing = False
                logger.info(
                    "mask-monitor: pushes to the Pushgateway at %s succeed again (%d failed, %d skipped so far)",
                    self.url, counts["failed"], counts["skipped"],
                )  # fmt: skip
            return
        self._last_error = error
        now = time.monotonic()
        started = not self._failing  # a new outage is reported at once
        self._failing = True
        if not started and now - self._last_warning < self.warn_interval:
            logger.debug("mask-monitor: push to %s failed: %r", self.url, error)
            return
        self._last_warning = now
        logger.warning(
            "mask-monitor: cannot push metrics to the Pushgateway at %s (%s); pushes run in the background, "
            "training goes on. So far %d of %d pushes failed and %d were skipped (replaced by a newer one before "
            "they were sent); reported again at most every %.0f s while pushes fail",
            self.url, _describe(error), counts["failed"], counts["requested"], counts["skipped"],
            self.warn_interval,
        )  # fmt: skip


def _describe(error: BaseException) -> str:
    reason = getattr(error, "reason", None)  # urllib's URLError wraps the socket error
    return f"{type(error).__name__}: {reason if reason is not None else error}"
