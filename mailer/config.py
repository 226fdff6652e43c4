"""One typed settings object, read from `MAILER_*` environment variables (and `.env`).

Settings are loaded once per process by `get_settings()`. A bad value stops the program with one
sentence that names the variable (see `describe_error`), never with a traceback.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)

# Secrets that people copy from examples: refusing them makes a forgotten placeholder a start-up error.
PLACEHOLDER_SECRETS = {"changeme", "change-me", "secret", "changethis", "please-change", "xxx"}
SECRET_FILE = Path(".mailer-secret")
# Redis hands an unacknowledged task to another worker after this many seconds (celery_app.py); a batch
# loop must end well before it, or a second loop would start on the same campaign while the first runs.
BROKER_VISIBILITY_TIMEOUT = 3600


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAILER_", env_file=".env", extra="ignore")

    database_url: str = "sqlite:///./mailer.db"
    broker_url: str = ""
    smtp_url: str = ""
    smtp_timeout: float = Field(default=30.0, gt=0)
    outbox_dir: Path = Path("./outbox")
    base_url: str = "http://127.0.0.1:8000"
    secret_key: str = ""
    from_: str = Field(default="Newsletter <newsletter@localhost>", alias="MAILER_FROM")
    admin_token: str = ""

    # The list's identity for the List-Id header and the mailto unsubscribe address.
    list_id: str = ""
    unsubscribe_mailto: str = ""
    site_name: str = "Truth and Resistance"
    # The news site itself, which mails link to for "and K more" in a category; empty: MAILER_BASE_URL.
    site_url: str = ""
    category_url: str = "{site_url}/category/{slug}"

    confirm_ttl_hours: float = Field(default=48.0, gt=0)
    send_welcome: bool = True
    confirm_resend_minutes: float = Field(default=10.0, ge=0)
    confirm_daily_cap: int = Field(default=5, ge=1)
    signup_rate_limit: str = "10/minute"
    admin_login_rate_limit: str = "20/minute"
    rate_limit_storage_url: str = ""
    trusted_proxies: Annotated[list[str], NoDecode] = []
    # Origins whose pages may POST sign-ups as JSON from script (CORS); forms need no entry here.
    signup_origins: Annotated[list[str], NoDecode] = []
    check_deliverability: bool = False

    # The sending engine. Connection and rate limits are per worker process.
    smtp_connections: int = Field(default=4, ge=1, le=100)
    # Across every worker of the deployment (needs a Redis broker); 0: no cap beyond the per-process one.
    smtp_max_connections: int = Field(default=0, ge=0, le=10_000)
    smtp_rate: float = Field(default=0.0, ge=0)
    domain_rate: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=200, ge=1, le=10_000)
    send_parallelism: int = Field(default=2, ge=1, le=64)
    task_seconds: float = Field(default=60.0, gt=0)
    retry_base_seconds: float = Field(default=300.0, gt=0)
    retry_deadline_hours: float = Field(default=72.0, gt=0)
    resend_unknown: bool = False
    worker_timeout: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    tick_seconds: float = Field(default=10.0, gt=0)
    pause_failure_rate: float = Field(default=0.2, gt=0, le=1)
    pause_failure_window: int = Field(default=200, ge=10)
    dkim_domain: str = ""
    dkim_selector: str = ""
    dkim_private_key: Path | None = None

    # Digests and feeds.
    schedule_digests: bool = True
    timezone: str = "America/New_York"
    digest_hour: int = Field(default=7, ge=0, le=23)
    digest_weekday: int = Field(default=0, ge=0, le=6, description="0 is Monday")
    feeds: Annotated[list[str], NoDecode] = []
    feed_poll_minutes: float = Field(default=15.0, gt=0)
    create_categories: bool = False
    digest_per_category: int = Field(default=10, ge=1, le=100)
    first_digest_hours: float = Field(default=0.0, ge=0, description="0: one period of the reader's frequency")
    # A run takes articles ingested up to this long before it starts, so an import still committing is
    # never skipped by a reader's cursor.
    digest_grace_seconds: float = Field(default=30.0, ge=0)

    # What comes back: return paths, the mailto unsubscribe, bounces, complaints (inbound.py).
    bounce_address: str = ""
    address_delimiter: str = "+"
    inbound_url: str = ""
    inbound_poll_seconds: float = Field(default=60.0, gt=0)
    inbound_max_bytes: int = Field(default=10_000_000, ge=10_000)
    # Mailman's defaults: five soft bounces, counted at most once a day, within seven days.
    soft_bounce_threshold: float = Field(default=5.0, gt=0)
    soft_bounce_days: float = Field(default=7.0, gt=0)
    pause_complaint_rate: float = Field(default=0.003, gt=0, le=1)
    # Below this many sent mails one early complaint is noise, not a rate (it would be 100% after one mail).
    pause_complaint_min_sent: int = Field(default=1000, ge=1)
    sns_topic_arns: Annotated[list[str], NoDecode] = []
    sns_cert_url_prefixes: Annotated[list[str], NoDecode] = []
    postmark_webhook_user: str = ""
    postmark_webhook_password: str = ""
    postmark_webhook_token: str = ""
    sendgrid_public_key: str = ""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _generated_key: str | None = PrivateAttr(default=None)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("is not a database URL such as sqlite:///./mailer.db") from None
        if url.get_backend_name() not in {"sqlite", "postgresql"}:
            raise ValueError("must be a sqlite:// or postgresql+psycopg:// URL")
        if url.get_backend_name() == "postgresql" and url.drivername == "postgresql":
            # Plain postgresql:// would pick psycopg2, which we do not install.
            value = url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in {"redis", "rediss", "amqp", "memory"}:
            raise ValueError("must be empty or a redis://host:6379/0 URL")
        return value

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, value: str) -> str:
        # Several servers may be listed, comma-separated, in order of preference (failover).
        for url in filter(None, (part.strip() for part in value.split(","))):
            parts = urlsplit(url)
            if parts.scheme not in {"smtp", "smtps"} or not parts.hostname:
                raise ValueError("must be empty or smtp://user:pass@host:port or smtps://…")
            try:
                parts.port  # noqa: B018 - reading it validates the port.
            except ValueError:
                raise ValueError("has a port that is not a number") from None
        return value.strip()

    @field_validator("dkim_private_key")
    @classmethod
    def _dkim_key(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"names {value}, which is not a readable file")
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError("must be an absolute http(s) URL such as https://news.example.org")
        return value.rstrip("/")

    @field_validator("site_url")
    @classmethod
    def _site_url(cls, value: str) -> str:
        return cls._base_url(value) if value else value

    @field_validator("category_url")
    @classmethod
    def _category_url(cls, value: str) -> str:
        try:
            example = value.format(site_url="https://news.example.org", slug="peace-diplomacy")
        except (KeyError, IndexError, ValueError):
            raise ValueError("may use only {site_url} and {slug}, as in {site_url}/category/{slug}") from None
        if urlsplit(example).scheme not in {"http", "https"}:
            raise ValueError("must give an absolute http(s) URL, such as {site_url}/category/{slug}")
        return value

    @field_validator("from_")
    @classmethod
    def _from(cls, value: str) -> str:
        from email.headerregistry import Address
        from email.utils import parseaddr

        name, addr = parseaddr(value)
        if "@" not in addr or any(ch in value for ch in "\r\n"):
            raise ValueError("must be an address such as 'Newsletter <news@example.org>'")
        Address(display_name=name, addr_spec=addr)
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, value: str) -> str:
        if value and (value.lower() in PLACEHOLDER_SECRETS or len(value) < 16):
            raise ValueError("is a placeholder or shorter than 16 characters; use a long random value")
        return value

    @field_validator("signup_rate_limit", "admin_login_rate_limit")
    @classmethod
    def _rate(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError("must look like '10/minute'") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"is {value!r}, which is not a time zone such as Europe/London") from None
        return value

    @field_validator("feeds", mode="before")
    @classmethod
    def _feeds(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            for url in value:
                if urlsplit(str(url)).scheme not in {"http", "https"}:
                    raise ValueError(f"has {url!r}, which is not an http(s) URL")
        return value

    @field_validator("bounce_address", "unsubscribe_mailto")
    @classmethod
    def _local_address(cls, value: str) -> str:
        value = value.strip()
        if value and (value.count("@") != 1 or not value.isascii() or any(ch in value for ch in " <>\r\n,;")
                      or not all(value.split("@"))):
            raise ValueError("must be a plain address such as bounces@news.example.org")
        return value

    @field_validator("address_delimiter")
    @classmethod
    def _delimiter(cls, value: str) -> str:
        if value not in {"+", "-", "=", "_"}:
            raise ValueError("must be one of + - = _ (your MTA's recipient delimiter)")
        return value

    @field_validator("inbound_url")
    @classmethod
    def _inbound_url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in {"imap", "imaps"} or not parts.hostname or not parts.username:
            raise ValueError("must be empty or imaps://user:password@host/INBOX (or imap:// on a trusted network)")
        try:
            parts.port  # noqa: B018 - reading it validates the port.
        except ValueError:
            raise ValueError("has a port that is not a number") from None
        return value

    @field_validator("sns_topic_arns", "sns_cert_url_prefixes", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("sns_cert_url_prefixes")
    @classmethod
    def _cert_prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            parts = urlsplit(prefix)
            if parts.scheme not in {"http", "https"} or not parts.netloc or not prefix.endswith("/"):
                raise ValueError(f"has {prefix!r}; each prefix must be an http(s) URL ending in '/'")
        return value

    @field_validator("sendgrid_public_key")
    @classmethod
    def _sendgrid_key(cls, value: str) -> str:
        if value:
            from mailer.public_keys import load_ec_public_key

            load_ec_public_key(value)
        return value.strip()

    @field_validator("signup_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            for item in value:
                parts = urlsplit(str(item))
                if item != "*" and (parts.scheme not in {"http", "https"} or not parts.netloc or parts.path):
                    raise ValueError(f"has {item!r}; give origins such as https://news.example.org, or *")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            for item in value:
                try:
                    ipaddress.ip_network(str(item), strict=False)
                except ValueError:
                    raise ValueError(f"has {item!r}, which is not an IP address or network") from None
        return value

    @field_validator("task_seconds")
    @classmethod
    def _task_seconds(cls, value: float) -> float:
        limit = BROKER_VISIBILITY_TIMEOUT // 3
        if value > limit:
            raise ValueError(f"must be at most {limit} (a third of the broker's visibility timeout of "
                             f"{BROKER_VISIBILITY_TIMEOUT} s), or a running task would be handed to a second worker")
        return value

    @model_validator(mode="after")
    def _timeouts(self) -> Settings:
        if self.worker_timeout < 3 * self.heartbeat_seconds:
            raise ValueError("MAILER_WORKER_TIMEOUT must be at least three times MAILER_HEARTBEAT_SECONDS, "
                             "or live workers would look dead")
        return self

    @cached_property
    def from_address(self) -> str:
        from email.utils import parseaddr

        return parseaddr(self.from_)[1]

    @cached_property
    def list_domain(self) -> str:
        return self.from_address.rpartition("@")[2] or "localhost"

    @cached_property
    def list_id_header(self) -> str:
        list_id = self.list_id or f"newsletter.{self.list_domain}"
        return f"{self.site_name} <{list_id}>"

    @cached_property
    def unsubscribe_address(self) -> str:
        return self.unsubscribe_mailto or f"unsubscribe@{self.list_domain}"

    @cached_property
    def return_path_base(self) -> str:
        """The address that bounces go to; each delivery's own return path adds a token to its local part."""
        return self.bounce_address or f"bounces@{self.list_domain}"

    @cached_property
    def smtp_urls(self) -> list[str]:
        return [part.strip() for part in self.smtp_url.split(",") if part.strip()]

    def category_link(self, slug: str) -> str:
        """The site's page for a category, where "and K more" in a digest leads."""
        return self.category_url.format(site_url=self.site_url or self.base_url, slug=slug)

    @property
    def dkim_enabled(self) -> bool:
        return bool(self.dkim_domain and self.dkim_selector and self.dkim_private_key)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def signing_key(self) -> str:
        """The secret key; when none is set, one is generated once and kept in `.mailer-secret`."""
        if self.secret_key:
            return self.secret_key
        if self._generated_key is None:
            if SECRET_FILE.exists():
                self._generated_key = SECRET_FILE.read_text().strip()
            else:
                self._generated_key = secrets.token_urlsafe(32)
                SECRET_FILE.write_text(self._generated_key + "\n")
                SECRET_FILE.chmod(0o600)
                log.warning(
                    "MAILER_SECRET_KEY is not set: generated one and kept it in %s; "
                    "set it explicitly when several machines share the database",
                    SECRET_FILE.resolve(),
                )
        return self._generated_key


def describe_error(error: ValidationError) -> str:
    """One sentence per bad setting, naming the environment variable."""
    lines = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        if not item["loc"]:
            # A check across settings names its variables in the message itself.
            lines.append(f"{message}.")
            continue
        field = str(item["loc"][0])
        name = field if field.startswith("MAILER_") else f"MAILER_{field.upper().rstrip('_')}"
        lines.append(f"{name} {message}.")
    return " ".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
