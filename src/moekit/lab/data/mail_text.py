"""The readable text of an e-mail: its body with the headers, the MIME structure, the transfer encodings and the
HTML markup taken away.

A raw mail and a page of a book differ first in *format* (header lines, quoted-printable, tags), and a quality
classifier trained on raw mails against prose learns that difference and nothing about the writing (GLaM's filter
compared web pages with curated text, both prose). :func:`mail_body_text` leaves the prose of a mail, so that a
classifier has to tell curated prose from mail prose. What a reader of the mail would see stays: quoted replies,
signatures and URLs written in the text are part of the body.

Parsing uses the standard library's :mod:`email` (lenient: a damaged mail yields what can be read, never an
exception) and :class:`html.parser.HTMLParser` (character references resolved, ``script`` and ``style`` dropped,
block elements as line breaks).
"""

from __future__ import annotations

import email
import email.policy
import re
from html.parser import HTMLParser

__all__ = ["html_to_text", "mail_body_text"]

# Elements whose end (or start) is a line break in the rendered text.
_BLOCK_TAGS = frozenset(
    "address article aside blockquote br dd div dl dt fieldset figcaption figure footer form h1 h2 h3 h4 h5 h6 "
    "header hr li main nav ol p pre section table tbody td tfoot th thead tr ul".split()
)
_HIDDEN_TAGS = frozenset({"script", "style", "head", "title"})
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


class _TextOfHTML(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0  # depth inside script / style / head

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN_TAGS:
            self.hidden += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN_TAGS:
            self.hidden = max(0, self.hidden - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def _tidy(text: str) -> str:
    """Runs of spaces as one space, no trailing spaces, at most one blank line in a row."""
    lines = [_SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def html_to_text(html: str) -> str:
    """The text an HTML fragment shows: tags removed, ``&amp;``-style references resolved, script and style
    dropped, block elements (paragraphs, rows, list items, ``br``) on their own lines."""
    parser = _TextOfHTML()
    parser.feed(html)
    parser.close()
    return _tidy("".join(parser.parts))


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)  # undoes base64 / quoted-printable; None for a multipart
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name in the header
        return payload.decode("latin-1")


def mail_body_text(raw: str | bytes) -> str:
    """The readable body of the raw mail ``raw``: the ``text/plain`` parts (decoded from their transfer encoding
    and charset), or, for a mail with none, its ``text/html`` parts reduced to text; attachments and other types
    dropped. Blank when the mail has no text part."""
    parse = email.message_from_bytes if isinstance(raw, bytes) else email.message_from_string
    message = parse(raw, policy=email.policy.compat32)
    plain, html = [], []
    for part in message.walk():
        if part.is_multipart() or part.get_filename():
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(_part_text(part))
        elif kind == "text/html":
            html.append(_part_text(part))
    if any(t.strip() for t in plain):
        text = "\n\n".join(plain)
        # A plain part that is HTML in disguise (common in spam) is reduced too.
        return html_to_text(text) if re.search(r"<(html|body|p|br|div|table|font)\b", text, re.I) else _tidy(text)
    return _tidy("\n\n".join(html_to_text(t) for t in html))
