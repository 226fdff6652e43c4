"""Sending limits: messages per second, per recipient domain, and SMTP connections in flight.

Without a broker everything runs in one process, and the limits live in memory here. With a Redis
broker (many workers on many machines) they hold across the whole deployment: a token bucket per
SMTP service and per recipient domain, and a lease per connection, kept in Redis and computed there
by small Lua scripts on Redis's own clock, so workers with skewed clocks still agree. Loops may run
in different threads and event loops, so in-memory state is guarded by a thread lock and waiting is
done with asyncio.sleep outside it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from functools import lru_cache
from typing import Any, Protocol

from mailer.config import Settings

log = logging.getLogger(__name__)


class Limiter(Protocol):
    rate: float

    async def take(self) -> None: ...


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


# Reserve one token: the bucket may go below zero, and the caller waits until its token is due. Tokens
# refill at ARGV[1] per second up to ARGV[2]; the key expires once idle, so nothing is left behind.
_TAKE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or t
tokens = math.min(capacity, tokens + (t - at) * rate) - 1
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(t))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 60)
if tokens >= 0 then return '0' end
return tostring(-tokens / rate)
"""


class RedisBucket:
    """A token bucket shared by every worker of the deployment through Redis."""

    def __init__(self, client: Any, key: str, rate: float) -> None:
        self.rate = rate
        self.key = key
        self.capacity = max(1.0, rate)
        self.script = client.register_script(_TAKE)

    async def take(self) -> None:
        if self.rate <= 0:
            return
        # The round trip runs in a thread, so the other connections of this loop go on meanwhile.
        wait = float(await asyncio.to_thread(self.script, keys=[self.key], args=[self.rate, self.capacity]))
        if wait > 0:
            await asyncio.sleep(wait)


def _key(*parts: str) -> str:
    return "mailer:rate:" + hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


class Throttle:
    def __init__(self, *, rate: float, domain_rate: float, redis_url: str = "", smtp_url: str = "") -> None:
        self.client = _redis(redis_url) if redis_url and (rate > 0 or domain_rate > 0) else None
        self.smtp_url = smtp_url
        # The listed servers are one mail service tried in order (failover), so they share one rate.
        self.server: Limiter = (RedisBucket(self.client, _key("server", smtp_url), rate) if self.client
                                else Bucket(rate))
        self.domain_rate = domain_rate
        self.domains: dict[str, Limiter] = {}

    @property
    def unlimited(self) -> bool:
        """No rate applies: nothing ever waits in take()."""
        return self.server.rate <= 0 and self.domain_rate <= 0

    async def take(self, recipient: str) -> None:
        if self.domain_rate > 0:
            domain = recipient.rpartition("@")[2].lower()
            bucket = self.domains.get(domain)
            if bucket is None:
                made: Limiter = (RedisBucket(self.client, _key("domain", domain), self.domain_rate) if self.client
                                 else Bucket(self.domain_rate))
                bucket = self.domains.setdefault(domain, made)
            await bucket.take()
        await self.server.take()


@lru_cache(maxsize=4)
def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=10)


def _shared_url(settings: Settings) -> str:
    return settings.broker_url if settings.broker_url.startswith(("redis://", "rediss://")) else ""


@lru_cache(maxsize=8)
def _throttle(smtp_url: str, rate: float, domain_rate: float, redis_url: str) -> Throttle:
    return Throttle(rate=rate, domain_rate=domain_rate, redis_url=redis_url, smtp_url=smtp_url)


def shared_throttle(settings: Settings) -> Throttle:
    """The one throttle for these SMTP servers and settings: the process's, or the deployment's in Redis."""
    return _throttle(settings.smtp_url, settings.smtp_rate, settings.domain_rate, _shared_url(settings))


# Take up to ARGV[2] leases out of ARGV[1] for ARGV[3] seconds; returns how many were granted. A lease
# of a worker that died runs out by itself.
_LEASE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local granted = math.max(0, math.min(free, tonumber(ARGV[2])))
for i = 1, granted do redis.call('ZADD', KEYS[1], t + tonumber(ARGV[3]), ARGV[4] .. ':' .. i) end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 60)
return granted
"""


class Leases:
    """SMTP connections in flight across the deployment (MAILER_SMTP_MAX_CONNECTIONS), in Redis."""

    def __init__(self, settings: Settings) -> None:
        url = _shared_url(settings)
        self.limit = settings.smtp_max_connections
        self.client = _redis(url) if url and self.limit > 0 else None
        self.key = _key("connections", settings.smtp_url)
        self.script = self.client.register_script(_LEASE) if self.client is not None else None
        # A loop holds its connections for at most MAILER_TASK_SECONDS and one more batch; a lease of a
        # killed worker ends a little after that, and the sweeper has handed its claims back by then.
        self.seconds = settings.task_seconds + 2 * settings.worker_timeout + 60

    def take(self, wanted: int, holder: str) -> int:
        if self.script is None or wanted <= 0:
            return wanted
        return int(self.script(keys=[self.key], args=[self.limit, wanted, self.seconds, holder]))

    def renew(self, holder: str, count: int) -> None:
        """Push this holder's leases out again; only leases it still holds (XX), none added."""
        if self.client is None or count <= 0:
            return
        seconds, micros = self.client.time()
        end = seconds + micros / 1_000_000 + self.seconds
        self.client.zadd(self.key, {f"{holder}:{i}": end for i in range(1, count + 1)}, xx=True)

    def give_back(self, holder: str, count: int) -> None:
        if self.client is None or count <= 0:
            return
        self.client.zrem(self.key, *[f"{holder}:{i}" for i in range(1, count + 1)])


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
