"""Templates to mail: subject, text and HTML from `templates/email/<kind>/`, then message bytes.

Rendering returns a value (`Rendered`); `build_message` turns it and a recipient into an
EmailMessage with the list headers; `to_bytes` serialises it with a line length of 998 so long
List-Unsubscribe URLs are never folded into encoded words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid, parseaddr
from functools import lru_cache
from typing import Any

import css_inline
from inscriptis import get_text
from inscriptis.model.config import ParserConfig
from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateError, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

from mailer import TEMPLATES_DIR
from mailer.config import get_settings
from mailer.errors import InvalidInput
from mailer.subscriptions import clean_name

POLICY = SMTP.clone(max_line_length=998)


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str
    headers: dict[str, str] = field(default_factory=dict)


@lru_cache(maxsize=1)
def environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(TEMPLATES_DIR / "email"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


@lru_cache(maxsize=1)
def _inliner() -> css_inline.CSSInliner:
    return css_inline.CSSInliner(keep_style_tags=False, load_remote_stylesheets=False)


def render(kind: str, context: dict[str, Any]) -> Rendered:
    """Render `<kind>/subject.txt`, `body.txt` and `body.html`; the subject is one line."""
    env = environment()
    settings = get_settings()
    context = {"site_name": settings.site_name, "base_url": settings.base_url, **context}
    subject = " ".join(env.get_template(f"{kind}/subject.txt").render(context).split())
    text = env.get_template(f"{kind}/body.txt").render(context)
    html = _inliner().inline(env.get_template(f"{kind}/body.html").render(context))
    return Rendered(subject=subject, text=text, html=html)


@lru_cache(maxsize=2)
def sandbox(autoescape: bool) -> SandboxedEnvironment:
    """Admins' templates run here: no access to Python internals, and undefined names are errors."""
    return SandboxedEnvironment(autoescape=autoescape, undefined=StrictUndefined)


def html_to_text(html: str) -> str:
    """A readable text part from HTML, with links written out."""
    text = str(get_text(html, ParserConfig(display_links=True)))
    # inscriptis pads table cells with spaces; mail readers want short lines and single blank lines.
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def render_admin_template(field: str, source: str, context: dict[str, Any], *, html: bool) -> str:
    """Render an admin's subject, HTML or text in the sandbox; errors name the field and line."""
    try:
        return sandbox(html).from_string(source).render(context)
    except TemplateError as error:
        line = getattr(error, "lineno", None)
        where = f" (line {line})" if line else ""
        raise InvalidInput(field, f"The {field} template has an error{where}: {error.message or error}") from None
    except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError, MemoryError) as error:
        # Expressions in an admin's template can fail like any Python expression ({{ 1/0 }}).
        raise InvalidInput(field, f"The {field} template fails when rendered: {type(error).__name__}: {error}") \
            from None


def render_campaign(*, subject: str, html: str, text: str, context: dict[str, Any], layout: str = "broadcast"
                    ) -> Rendered:
    """An admin's campaign inside the `<layout>/` templates; the text part is made from HTML when empty."""
    body_html = render_admin_template("html", html, context, html=True)
    body_text = render_admin_template("text", text, context, html=False) if text.strip() else html_to_text(body_html)
    wrapped = {**context, "content_html": body_html, "content_text": body_text,
               "subject": render_admin_template("subject", subject, context, html=False)}
    return render(layout, wrapped)


ONE_CLICK = "List-Unsubscribe=One-Click"


def list_unsubscribe(unsubscribe_url: str, mailto: str = "") -> str:
    """The List-Unsubscribe value: the one-click URL first, then the reader's own mailto address."""
    return f"<{unsubscribe_url}>, <mailto:{mailto or get_settings().unsubscribe_address}?subject=unsubscribe>"


def list_headers(*, unsubscribe_url: str, mailto: str = "") -> dict[str, str]:
    """RFC 2369 / RFC 8058 list headers carried by every mail to a subscriber."""
    return {
        "List-Id": get_settings().list_id_header,
        "List-Unsubscribe": list_unsubscribe(unsubscribe_url, mailto),
        "List-Unsubscribe-Post": ONE_CLICK,
    }


def build_message(rendered: Rendered, *, to_email: str, to_name: str = "", headers: dict[str, str] | None = None
                  ) -> EmailMessage:
    settings = get_settings()
    from_name, from_addr = parseaddr(settings.from_)
    message = EmailMessage(policy=POLICY)
    message["Subject"] = rendered.subject
    message["From"] = Address(display_name=from_name, addr_spec=from_addr)
    message["To"] = Address(display_name=clean_name(to_name), addr_spec=to_email)
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain=settings.list_domain)
    for name, value in {**rendered.headers, **(headers or {})}.items():
        if any(ch in value for ch in "\r\n"):
            raise ValueError(f"header {name} holds a line break")
        message[name] = value
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    return message


def to_bytes(message: EmailMessage) -> bytes:
    return message.as_bytes(policy=POLICY)
