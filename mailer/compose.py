"""Render once per distinct content, then personalise each reader's mail at the byte level.

`prepare()` renders a mail's subject, text and HTML once, with each personal field replaced by a
random marker that survives Jinja escaping and CSS inlining. `MessageTemplate.personalise()` then
swaps in one reader's values (HTML-escaped in the HTML part), encodes both parts as
quoted-printable and joins them with pre-built header bytes. That costs tens of microseconds per
reader instead of a full render and MIME build (about 2 ms; ../shared/GUIDE.md §5).
"""

from __future__ import annotations

import binascii
import html
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.header import Header
from email.utils import formatdate, parseaddr
from typing import Any

from mailer.config import get_settings
from mailer.errors import InvalidInput
from mailer.render import ONE_CLICK, Rendered, list_unsubscribe

PERSONAL_FIELDS = ("name", "email", "unsubscribe_url", "preferences_url")
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~ ")


@dataclass(frozen=True)
class Reader:
    """One recipient's personal values."""

    email: str
    name: str
    unsubscribe_url: str
    preferences_url: str
    # The reader's own List-Unsubscribe mailto (addresses.unsubscribe_mailto); empty means the list's plain one.
    unsubscribe_mailto: str = ""

    def fields(self) -> dict[str, str]:
        return {"name": self.name, "email": self.email, "unsubscribe_url": self.unsubscribe_url,
                "preferences_url": self.preferences_url}


def markers() -> dict[str, str]:
    """Fresh markers for the personal fields: letters and digits only, so no escaping touches them."""
    nonce = secrets.token_hex(6)
    return {field: f"zmlr{nonce}{field.replace('_', '')}z" for field in PERSONAL_FIELDS}


def encode_header_value(value: str) -> str:
    """A header value as ASCII: as-is when it is printable ASCII, else an RFC 2047 encoded word."""
    if value.isascii() and value.isprintable():
        return value
    # Encoded words of at most 75 characters, folded onto continuation lines (RFC 2047).
    return Header(value, "utf-8", header_name="Subject").encode(linesep="\r\n")


def format_address(name: str, address: str) -> str:
    if not name:
        return address
    if name.isascii() and name.isprintable():
        if set(name) <= _ATEXT:
            return f"{name} <{address}>"
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{address}>'
    return f"{encode_header_value(name)} <{address}>"


def _qp(text: str) -> bytes:
    # binascii's quoted-printable is C code; it keeps "\n", which SMTP wants as CRLF.
    return binascii.b2a_qp(text.replace("\r\n", "\n").encode("utf-8")).replace(b"\n", b"\r\n")


# HTML lines are kept well under SMTP's 998 octets, leaving room for the longest personal value.
HTML_LINE = 600
SAFE_LINE = 990


def fold_lines(content: str, linesep: str) -> str:
    """Break long lines at spaces (in HTML a space and a line break are the same) so no line nears 998 octets."""
    lines = []
    for line in content.replace("\r\n", "\n").split("\n"):
        while len(line) > HTML_LINE:
            cut = line.rfind(" ", 0, HTML_LINE)
            if cut <= 0:
                cut = line.find(" ", HTML_LINE)
                if cut < 0:
                    break
            lines.append(line[:cut])
            line = line[cut + 1:]
        lines.append(line)
    return linesep.join(lines)


def _short_lines(body: bytes) -> bool:
    return max(map(len, body.split(b"\r\n"))) <= SAFE_LINE


def text_part(text: str, *, eight_bit: bool = False, short: bool | None = None) -> tuple[bytes, bytes]:
    """The text part as (Content-Transfer-Encoding, body): 7bit when it is ASCII, 8bit UTF-8 when the server
    takes 8BITMIME, quoted-printable otherwise. `text` ends lines with CRLF; a line near 998 octets means QP.
    `short` says the lines are known to be short (see Pieces.short)."""
    ascii_text = text.isascii()
    if ascii_text or eight_bit:
        body = text.encode("utf-8")
        if short or (short is None and _short_lines(body)):
            return (b"7bit" if ascii_text else b"8bit"), body
    return b"quoted-printable", _qp(text)


def html_part(body: bytes, *, short: bool | None = None) -> tuple[bytes, bytes]:
    """The HTML part as (Content-Transfer-Encoding, body). Non-ASCII was turned into character references,
    so the part is 7bit and needs no encoding per reader; a rare over-long line falls back to quoted-printable."""
    if short or (short is None and _short_lines(body)):
        return b"7bit", body
    return b"quoted-printable", _qp(body.decode("ascii"))


def _line_budget(content: str, marks: Mapping[str, str], encode: Callable[[str], bytes]) -> tuple[int, int]:
    """(longest line without its markers, most markers on one line), in encoded octets: with them, a
    reader's values of at most V octets give lines of at most `longest + most * V`, no scan needed."""
    longest = most = 0
    pattern = re.compile("|".join(map(re.escape, [m for m in marks.values() if m]))) if any(marks.values()) else None
    for line in content.split("\r\n"):
        found = len(pattern.findall(line)) if pattern else 0
        bare = pattern.sub("", line) if pattern and found else line
        longest, most = max(longest, len(encode(bare))), max(most, found)
    return longest, most


def _html_bytes(text: str) -> bytes:
    return text.encode("ascii", "xmlcharrefreplace")


@dataclass(frozen=True)
class Pieces:
    """Rendered content cut at the markers: static pieces with a field name between each two."""

    static: tuple[str, ...]
    fields: tuple[str, ...]

    @classmethod
    def cut(cls, content: str, marks: Mapping[str, str]) -> Pieces:
        by_marker = {marker: field for field, marker in marks.items() if marker}
        if not by_marker:
            return cls((content,), ())
        split = re.split("(" + "|".join(map(re.escape, by_marker)) + ")", content)
        return cls(tuple(split[0::2]), tuple(by_marker[m] for m in split[1::2]))

    def fill(self, values: Mapping[str, str]) -> str:
        if not self.fields:
            return self.static[0]
        out = [self.static[0]]
        for field, piece in zip(self.fields, self.static[1:], strict=True):
            out.append(values[field])
            out.append(piece)
        return "".join(out)


@dataclass(frozen=True)
class HtmlPieces:
    """Like Pieces, with the static HTML already encoded: per reader only the values are escaped and encoded."""

    static: tuple[bytes, ...]
    fields: tuple[str, ...]

    @classmethod
    def of(cls, pieces: Pieces) -> HtmlPieces:
        return cls(tuple(_html_bytes(piece) for piece in pieces.static), pieces.fields)

    def fill(self, values: Mapping[str, str]) -> bytes:
        out = [self.static[0]]
        for field, piece in zip(self.fields, self.static[1:], strict=True):
            out.append(_html_bytes(html.escape(values[field])))
            out.append(piece)
        return b"".join(out)


@dataclass(frozen=True)
class MessageTemplate:
    """A rendered mail, cut at the markers where personal values go."""

    subject: Pieces
    text: Pieces
    html: HtmlPieces
    shared_headers: bytes
    boundary: str
    text_budget: tuple[int, int]
    html_budget: tuple[int, int]

    def personalise(self, reader: Reader, *, message_id: str, extra_headers: Mapping[str, str] = {},
                    eight_bit: bool = False) -> bytes:
        values = reader.fields()
        subject = self.subject.fill(values)
        text = self.text.fill(values)
        # The longest value as it lands in each part: UTF-8 in the text, escaped and 7bit in the HTML.
        text_widest = max(len(value.encode("utf-8")) for value in values.values())
        html_widest = max(len(_html_bytes(html.escape(value))) for value in values.values())
        text_short = self.text_budget[0] + self.text_budget[1] * text_widest <= SAFE_LINE
        html_short = self.html_budget[0] + self.html_budget[1] * html_widest <= SAFE_LINE
        encoding, html_body = html_part(self.html.fill(values), short=html_short or None)
        text_encoding, text_body = text_part(text, eight_bit=eight_bit, short=text_short or None)
        headers = [
            f"To: {format_address(reader.name, reader.email)}",
            f"Subject: {encode_header_value(' '.join(subject.split()))}",
            f"Message-ID: {message_id}",
            f"List-Unsubscribe: {list_unsubscribe(reader.unsubscribe_url, reader.unsubscribe_mailto)}",
        ]
        headers.extend(f"{name}: {encode_header_value(value)}" for name, value in extra_headers.items())
        boundary = self.boundary.encode()
        return b"".join((
            self.shared_headers,
            "\r\n".join(headers).encode("ascii"),
            b"\r\n\r\n--", boundary,
            b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: ", text_encoding, b"\r\n\r\n",
            text_body,
            b"\r\n--", boundary,
            b"\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: ", encoding, b"\r\n\r\n",
            html_body,
            b"\r\n--", boundary, b"--\r\n",
        ))


def check_fields_untouched(render: Callable[[dict[str, Any]], Rendered]) -> None:
    """Render with two unrelated sets of markers (different letters and lengths): a template that only
    prints or tests a reader's field gives the same output once the markers are blanked out. One that
    slices, measures or filters a field (`name[:1]`, `name|length`, `name|truncate`) does not, and is
    refused, because the reader's value could not be put in its place."""
    first = markers()
    second = {field: f"q{secrets.token_hex(9)}{field.replace('_', '')}q" for field in PERSONAL_FIELDS}
    outputs = []
    for marks in (first, second):
        rendered = render(dict(marks))
        blanked = []
        for part in (rendered.subject, rendered.html, rendered.text):
            for field, marker in marks.items():
                part = part.replace(marker, f"\x00{field}\x00")
            blanked.append(part)
        outputs.append(blanked)
    for name, one, two in zip(("subject", "html", "text"), outputs[0], outputs[1], strict=True):
        if one != two:
            raise InvalidInput(name, f"In the {name}, a reader's field ({', '.join(PERSONAL_FIELDS)}) can be "
                                     "printed, as in {{ name }}, or tested, as in {% if name %}, but not cut, "
                                     "measured or changed by a filter.")


def check_markers(rendered: Rendered, marks: Mapping[str, str]) -> None:
    """Refuse templates that transform a personal field (`{{ name | upper }}`): the marker would come out
    changed, and the reader's value could not be put in. Printing and testing a field are fine."""
    stem = next(iter(marks.values()))[:16].lower()  # "zmlr" and the nonce, shared by every marker
    for part, output in (("subject", rendered.subject), ("html", rendered.html), ("text", rendered.text)):
        if output.lower().count(stem) != sum(output.count(marker) for marker in marks.values()):
            raise InvalidInput(part, f"In the {part}, a reader's field ({', '.join(PERSONAL_FIELDS)}) can be "
                                     "printed, as in {{ name }}, or tested, as in {% if name %}, but not changed "
                                     "by a filter or an expression.")


def prepare(render: Callable[[dict[str, Any]], Rendered], context: dict[str, Any], *,
            with_name: bool = True) -> MessageTemplate:
    """Render once with markers for the personal fields; `render` gets the context with the markers in it.

    Templates may test the name (`{% if name %}`, `{{ name or 'reader' }}`), so readers with and
    without a name get separate renders (`with_name`); every other field is never empty."""
    settings = get_settings()
    marks = markers()
    if not with_name:
        marks["name"] = ""
    rendered = render({**context, **marks})
    check_markers(rendered, {k: v for k, v in marks.items() if v})
    boundary = f"=_mailer_{secrets.token_hex(12)}"
    from_name, from_addr = parseaddr(settings.from_)
    shared = [
        f"From: {format_address(from_name, from_addr)}",
        f"Date: {formatdate(usegmt=True)}",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/alternative; boundary="{boundary}"',
        f"List-Id: {encode_header_value(settings.list_id_header)}",
        f"List-Unsubscribe-Post: {ONE_CLICK}",
    ]
    shared.extend(f"{name}: {encode_header_value(value)}" for name, value in rendered.headers.items())
    text = fold_lines(rendered.text, "\r\n")
    body = fold_lines(rendered.html, "\r\n")
    return MessageTemplate(
        subject=Pieces.cut(rendered.subject, marks),
        text=Pieces.cut(text, marks),
        html=HtmlPieces.of(Pieces.cut(body, marks)),
        text_budget=_line_budget(text, marks, lambda line: line.encode("utf-8")),
        html_budget=_line_budget(body, marks, _html_bytes),
        shared_headers=("\r\n".join(shared) + "\r\n").encode("ascii"),
        boundary=boundary,
    )


# Template renders made by this process, for the log line at the end of a send loop and for the
# benchmarks' count: the whole point of rendering once per distinct content is that this stays small.
renders_made = 0


class Variants:
    """A mail's renders, made on first use: one for readers with a name and one for readers without."""

    def __init__(self, render: Callable[[dict[str, Any]], Rendered], context: dict[str, Any] | None = None) -> None:
        self.render = render
        self.context = context or {}
        self.made: dict[bool, MessageTemplate] = {}
        self.renders = 0

    def for_reader(self, reader: Reader) -> MessageTemplate:
        key = bool(reader.name)
        template = self.made.get(key)
        if template is None:
            template = self.made[key] = prepare(self.render, self.context, with_name=key)
            self.renders += 1
            global renders_made
            renders_made += 1
        return template
