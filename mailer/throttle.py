"""Per-process rate limits: messages per second per SMTP server, and per recipient domain."""

from __future__ import annotations

import asyncio
import time


class Bucket:
    """A token bucket; `take()` waits until a token is free. A rate of 0 means no limit."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    async def take(self) -> None:
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


class Throttle:
    def __init__(self, *, rate: float, domain_rate: float) -> None:
        self.server = Bucket(rate)
        self.domain_rate = domain_rate
        self.domains: dict[str, Bucket] = {}

    async def take(self, recipient: str) -> None:
        if self.domain_rate > 0:
            domain = recipient.rpartition("@")[2].lower()
            bucket = self.domains.get(domain)
            if bucket is None:
                bucket = self.domains[domain] = Bucket(self.domain_rate)
            await bucket.take()
        await self.server.take()
