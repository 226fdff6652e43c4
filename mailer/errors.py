"""The exceptions mailer raises on purpose. Anything else is a bug.

    MailerError
     ├── InvalidInput            bad data from a person or a program; the message is shown to them
     │    └── InvalidEmail
     ├── TokenError              a link token that cannot be used
     │    ├── BadToken           tampered, garbage, or made for another purpose (400)
     │    ├── ExpiredToken       signed by us but too old; `subscriber_id` says whose it was
     │    └── UsedToken          already used, or replaced by a newer one
     ├── NotFound                the thing a token or id points at is gone (404)
     ├── Conflict                the thing is in a state that does not allow this (409)
     ├── RateLimited             too many attempts; try again later (429)
     ├── LoginRefused            wrong admin password, or a locked account (401)
     ├── Rejected                a webhook request that did not prove it came from its provider;
     │                           `status` is the HTTP answer (401, 403…), the message says why
     └── MailboxError            the IMAP mailbox could not be reached or read; the next poll tries again
"""

from __future__ import annotations


class MailerError(Exception):
    """Base of every deliberate error."""


class InvalidInput(MailerError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InvalidEmail(InvalidInput):
    def __init__(self, message: str) -> None:
        super().__init__("email", message)


class TokenError(MailerError):
    pass


class BadToken(TokenError):
    pass


class ExpiredToken(TokenError):
    def __init__(self, subscriber_id: int) -> None:
        super().__init__("This link has expired.")
        self.subscriber_id = subscriber_id


class UsedToken(TokenError):
    def __init__(self, subscriber_id: int) -> None:
        super().__init__("This link has already been used.")
        self.subscriber_id = subscriber_id


class NotFound(MailerError):
    pass


class Conflict(MailerError):
    pass


class RateLimited(MailerError):
    pass


class LoginRefused(MailerError):
    pass


class Rejected(MailerError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class MailboxError(MailerError):
    pass
