"""Per-process limits shared by every sending loop of the process: messages per second, per recipient
domain, and SMTP connections in flight. Loops may run in different threads and event loops, so the
state is guarded by a thread lock and waiting is done with asyncio.sleep outside it."""

from __future__ import annotations

import asyncio
import threading
import time
from functools import lru_cache

from mailer.config import Settings


class Bucket:
    """A token bucket; `take()` waits until a token is free. A rate of 0 means no limit."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self.lock = threading.Lock()

    async def take(self) -> None:
        if self.rate <= 0:
            return
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                wait = (1 - self.tokens) / self.rate
            await asyncio.sleep(wait)


class Throttle:
    def __init__(self, *, rate: float, domain_rate: float) -> None:
        self.server = Bucket(rate)
        self.domain_rate = domain_rate
        self.domains: dict[str, Bucket] = {}

    @property
    def unlimited(self) -> bool:
        """No rate applies: nothing ever waits in take()."""
        return self.server.rate <= 0 and self.domain_rate <= 0

    async def take(self, recipient: str) -> None:
        if self.domain_rate > 0:
            domain = recipient.rpartition("@")[2].lower()
            bucket = self.domains.get(domain)
            if bucket is None:
                bucket = self.domains.setdefault(domain, Bucket(self.domain_rate))
            await bucket.take()
        await self.server.take()


@lru_cache(maxsize=8)
def _throttle(smtp_url: str, rate: float, domain_rate: float) -> Throttle:
    return Throttle(rate=rate, domain_rate=domain_rate)


def shared_throttle(settings: Settings) -> Throttle:
    """The process's one throttle for its SMTP servers and settings."""
    return _throttle(settings.smtp_url, settings.smtp_rate, settings.domain_rate)


class Permits:
    """SMTP connections in flight in this process, shared by its sending loops."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.used = 0

    def take(self, limit: int) -> int:
        with self.lock:
            granted = max(0, limit - self.used)
            self.used += granted
            return granted

    def give_back(self, count: int) -> None:
        with self.lock:
            self.used = max(0, self.used - count)


connections = Permits()
