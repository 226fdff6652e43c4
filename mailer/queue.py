"""Hand work to Celery when a broker is set, or to an in-process thread pool when not.

Callers pass a job name and ids only; the database holds everything else. In-process jobs run on
a small pool so a web request never waits for SMTP, and retry temporary failures with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from mailer.config import get_settings

log = logging.getLogger(__name__)

IN_PROCESS_RETRIES = 5

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_futures: set[Future[None]] = set()


def _jobs() -> dict[str, Callable[..., object]]:
    from mailer import campaigns, delivery, imap, imports, inbound, notices

    return {"send_notice": notices.send_notice, "run_campaign": delivery.run_campaign, "tick": campaigns.tick,
            "import_subscribers": imports.run, "process_inbound": inbound.process, "poll_mailbox": imap.poll_task}


def _run(name: str, args: tuple[int, ...]) -> None:
    from mailer.notices import TemporaryFailure

    job = _jobs()[name]
    for attempt in range(IN_PROCESS_RETRIES + 1):
        try:
            job(*args)
            return
        except TemporaryFailure as failure:
            if attempt == IN_PROCESS_RETRIES:
                log.error("giving up on %s%s after %d attempts: %s", name, args, attempt + 1, failure)
                return
            time.sleep(min(60.0, 2.0**attempt))
        except Exception:
            log.exception("job %s%s failed", name, args)
            return


def dispatch(name: str, *ids: int) -> None:
    """Queue a job; call it only after the transaction that made its rows has committed."""
    if name not in _jobs():
        raise KeyError(name)
    broker_url = get_settings().broker_url
    if broker_url:
        from mailer.celery_app import client_for

        try:
            client_for(broker_url).send_task(f"mailer.{name}", args=list(ids))
        except Exception:
            # The rows are committed; the periodic tick queues their work again once the broker is back.
            log.exception("could not queue %s%s; the tick will retry", name, ids)
        return
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mailer-job")
        future = _executor.submit(_run, name, ids)
        _futures.add(future)
    future.add_done_callback(_futures.discard)


def drain(timeout: float = 30.0) -> None:
    """Wait for queued in-process jobs to finish (tests, and a clean shutdown)."""
    with _lock:
        pending = list(_futures)
    wait(pending, timeout=timeout)


class Ticker:
    """Runs `campaigns.tick` every MAILER_TICK_SECONDS in a thread: Celery beat's job when there is no broker."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mailer-ticker", daemon=True)

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def _loop(self) -> None:
        from mailer import campaigns

        while not self._stop.wait(get_settings().tick_seconds):
            try:
                campaigns.tick()
            except Exception:
                log.exception("tick failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
