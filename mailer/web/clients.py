"""Who is asking: the client address (trusting X-Forwarded-For only from configured proxies) and rate limits."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from fastapi import Request
from limits import parse, storage, strategies

from mailer.config import get_settings


def _trusted(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_ip(request: Request) -> str:
    """The client's address. X-Forwarded-For counts only when the peer is a trusted proxy; then the
    right-most address that is not itself a trusted proxy is the client (the left part can be forged)."""
    peer = request.client.host if request.client else "unknown"
    networks = [ipaddress.ip_network(p, strict=False) for p in get_settings().trusted_proxies]
    if not networks or not _trusted(peer, networks):
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, networks):
            return hop
    return hops[0] if hops else peer


@lru_cache(maxsize=4)
def _limiter(url: str) -> strategies.MovingWindowRateLimiter:
    return strategies.MovingWindowRateLimiter(storage.storage_from_string(url))


def limiter_storage_url() -> str:
    settings = get_settings()
    if settings.rate_limit_storage_url:
        return settings.rate_limit_storage_url
    # Several web processes behind one broker share their counts through it.
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return settings.broker_url
    return "memory://"


def allow_signup(ip: str) -> bool:
    """Count one sign-up attempt from an address; False once it is over the configured rate."""
    return bool(_limiter(limiter_storage_url()).hit(parse(get_settings().signup_rate_limit), "signup", ip))
