"""Admin accounts, sign-in with lock-out, browser sessions with CSRF tokens, and the audit trail.

Passwords are argon2 hashes (argon2-cffi). After `MAX_FAILURES` wrong passwords in a row an account
is locked for `LOCK_MINUTES`; the lock is per account, so a guesser cannot keep trying from many
addresses. A session cookie holds a random token and the database only its sha256, so a copy of the
database does not sign anyone in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from mailer.errors import Conflict, InvalidInput, LoginRefused
from mailer.models import Admin, AdminAction, AdminSession, utcnow

# Wrong passwords in a row, from anywhere, before the whole account is locked; a lower limit per
# account and client address applies first (web/clients.py), so one stranger cannot lock an admin out.
MAX_FAILURES = 20
LOCK_MINUTES = 15
# One answer for every refusal: it must not tell whether the account exists or is locked.
REFUSED = ("Those details did not work. After repeated failures, signing in waits for 15 minutes; "
           "ask another admin to run `mailer admin create --reset` if you have lost your password.")
SESSION_HOURS = 12
PASSWORD_MIN = 10

_hasher = PasswordHasher()


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    # Unknown accounts are checked against this, so a wrong address costs as long as a wrong password.
    return _hasher.hash(secrets.token_urlsafe(16))


def _email(raw: str) -> str:
    email = raw.strip().lower()
    if "@" not in email or len(email) > 320 or any(c.isspace() for c in email):
        raise InvalidInput("email", "Give the admin's email address, such as editor@example.org.")
    return email


def check_password(password: str) -> str:
    if len(password) < PASSWORD_MIN:
        raise InvalidInput("password", f"A password needs at least {PASSWORD_MIN} characters.")
    if len(password) > 1000:
        raise InvalidInput("password", "A password can have at most 1000 characters.")
    return password


def create(session: Session, *, email: str, password: str) -> Admin:
    address = _email(email)
    check_password(password)
    if session.scalar(select(Admin.id).where(Admin.email == address)) is not None:
        raise Conflict(f"An admin {address} already exists; use --reset to give it a new password.")
    admin = Admin(email=address, password_hash=_hasher.hash(password))
    session.add(admin)
    session.flush()
    return admin


def reset_password(session: Session, *, email: str, password: str) -> Admin:
    admin = session.scalar(select(Admin).where(Admin.email == _email(email)))
    if admin is None:
        raise InvalidInput("email", f"There is no admin {email.strip()}.")
    admin.password_hash = _hasher.hash(check_password(password))
    admin.failed_logins, admin.locked_until = 0, None
    # A new password signs out every browser that used the old one.
    session.execute(delete(AdminSession).where(AdminSession.admin_id == admin.id))
    return admin


def all_admins(session: Session) -> list[Admin]:
    return list(session.scalars(select(Admin).order_by(Admin.email)))


def remove(session: Session, *, email: str) -> None:
    admin = session.scalar(select(Admin).where(Admin.email == _email(email)))
    if admin is None:
        raise InvalidInput("email", f"There is no admin {email.strip()}.")
    # Sessions go with the account (ON DELETE CASCADE), and explicitly, for SQLite without foreign keys.
    session.execute(delete(AdminSession).where(AdminSession.admin_id == admin.id))
    session.delete(admin)


def authenticate(session: Session, *, email: str, password: str) -> Admin:
    """The admin whose password this is, or LoginRefused with one sentence for every kind of refusal."""
    admin = session.scalar(select(Admin).where(Admin.email == email.strip().lower()).with_for_update())
    now = utcnow()
    # argon2 runs on every path, so the time taken says nothing about the account either.
    matches = _verify(admin.password_hash if admin else _dummy_hash(), password)
    if admin is None:
        raise LoginRefused(REFUSED)
    if admin.locked_until is not None and admin.locked_until > now:
        raise LoginRefused(REFUSED)
    if not matches:
        admin.failed_logins += 1
        if admin.failed_logins >= MAX_FAILURES:
            admin.locked_until = now + timedelta(minutes=LOCK_MINUTES)
            admin.failed_logins = 0
        # The count must outlive the error: the caller's transaction rolls back when this raises.
        session.commit()
        raise LoginRefused(REFUSED)
    admin.failed_logins, admin.locked_until, admin.last_login_at = 0, None, now
    if _hasher.check_needs_rehash(admin.password_hash):
        admin.password_hash = _hasher.hash(password)
    return admin


def check_password_timing(password: str) -> None:
    """Spend what a real check costs, for refusals decided before the database is asked."""
    _verify(_dummy_hash(), password)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SignedIn:
    admin_id: int
    email: str
    csrf: str


def open_session(session: Session, admin: Admin) -> str:
    """Start a browser session; returns the cookie value."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    # Old sessions of any admin are cleared here, so the table never grows without bound.
    session.execute(delete(AdminSession).where(AdminSession.expires_at < now))
    session.add(AdminSession(token_hash=_digest(token), admin_id=admin.id, csrf=secrets.token_urlsafe(32),
                             expires_at=now + timedelta(hours=SESSION_HOURS)))
    return token


def signed_in(session: Session, token: str | None) -> SignedIn | None:
    if not token or len(token) > 200:
        return None
    row = session.execute(
        select(AdminSession.admin_id, AdminSession.csrf, AdminSession.expires_at, Admin.email)
        .join(Admin, Admin.id == AdminSession.admin_id)
        .where(AdminSession.token_hash == _digest(token))
    ).first()
    if row is None or row.expires_at <= utcnow():
        return None
    return SignedIn(admin_id=row.admin_id, email=row.email, csrf=row.csrf)


def close_session(session: Session, token: str | None) -> None:
    if token:
        session.execute(delete(AdminSession).where(AdminSession.token_hash == _digest(token)))


def csrf_matches(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


def record(session: Session, *, actor: str, action: str, target: str = "", reason: str = "") -> None:
    """Write one line of the audit trail, in the same transaction as the change it describes."""
    session.add(AdminAction(actor=actor[:320], action=action[:40], target=target[:400], reason=reason))
