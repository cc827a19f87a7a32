"""Values in log lines, logfmt-style: one call is one line, and a value can never pose as a field or a line.

A value made only of safe characters (letters, digits and `_ . : / @ + - , [ ] %`) is written bare, as before:
`user=alice`, `peer=ipv4:127.0.0.1:50312`. Anything else — a space, a quote, `=`, a backslash, a control or
other non-printable character, any non-ASCII letter — is written in double quotes with `\\`, `"` and every
non-printable character escaped (`\\n`, `\\r`, `\\t`, `\\xNN`, `\\uNNNN`), so a username or account number
holding `\\n2099-01-01 … gateway INFO method=…` stays inside its own field on its own line.

The safe case (nearly every value) costs one compiled-regex match; quoting is paid only by odd values.
"""
from __future__ import annotations

import re

# A match object (truthy) if `text` may be written bare; logfmt's callers on a hot path test this inline.
is_bare = re.compile(r"[A-Za-z0-9_.:/@+\-,\[\]%]+").fullmatch
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    short = _SHORT.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str) -> str:
    """`text` with `\\`, `"` and every non-printable character escaped (line breaks included)."""
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def quoted(text: str) -> str:
    return f'"{escape(text)}"'


def value(raw: object) -> str:
    """One logfmt value: bare if it is safe to be, else quoted and escaped."""
    text = raw if type(raw) is str else str(raw)
    return text if is_bare(text) else quoted(text)
