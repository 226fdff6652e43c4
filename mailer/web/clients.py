"""Who is asking: the client address (trusting X-Forwarded-For only from configured proxies) and rate limits."""

from __future__ import annotations

import ipaddress
import logging
from functools import lru_cache

from fastapi import Request
from limits import parse, storage, strategies

from mailer.config import get_settings

log = logging.getLogger(__name__)


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
        if not _is_ip(hop):
            # A proxy we trust wrote garbage, or a client forged this part: stop at the last good hop.
            break
        if not _trusted(hop, networks):
            return hop
    return peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


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


def rate_key(ip: str) -> str:
    """IPv6 clients are counted per /64: one subscriber line usually owns the whole /64."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def allow_login(ip: str) -> bool:
    """Count one admin sign-in attempt from an address. Unlike sign-ups, a broken limiter refuses: the
    per-account lock-out still holds, but guessing must not get cheaper when a service is down."""
    try:
        return bool(_limiter(limiter_storage_url()).hit(parse(get_settings().admin_login_rate_limit), "login",
                                                        rate_key(ip)))
    except Exception:
        log.exception("the admin sign-in rate limiter is unavailable")
        return False


# Wrong passwords for one account from one client address before that pair must wait.
LOGIN_FAILURES = "5/15minutes"


def login_blocked(email: str, ip: str) -> bool:
    """True after too many wrong passwords for this account from this address. Counting per pair means
    a stranger cannot lock an admin out from elsewhere; the account-wide lock (admins.py) is higher."""
    try:
        return not _limiter(limiter_storage_url()).test(parse(LOGIN_FAILURES), "login-failure",
                                                        email.strip().lower()[:320], rate_key(ip))
    except Exception:
        log.exception("the admin sign-in failure counter is unavailable")
        return True


def record_login_failure(email: str, ip: str) -> None:
    try:
        _limiter(limiter_storage_url()).hit(parse(LOGIN_FAILURES), "login-failure", email.strip().lower()[:320],
                                            rate_key(ip))
    except Exception:
        log.exception("the admin sign-in failure counter is unavailable")


def allow_signup(ip: str) -> bool:
    """Count one sign-up attempt from an address; False once it is over the configured rate.
    If the limiter's store is down, sign-ups go on (logged): double opt-in still protects them."""
    try:
        return bool(_limiter(limiter_storage_url()).hit(parse(get_settings().signup_rate_limit), "signup",
                                                        rate_key(ip)))
    except Exception:
        log.exception("the sign-up rate limiter is unavailable")
        return True
