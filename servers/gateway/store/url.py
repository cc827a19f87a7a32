"""Store URLs: made safe to show, and pointed at another database.

A store URL may carry a password (`postgresql://user:secret@host/db`, or `?password=secret`). It must never
reach a log line or an error message, so every place that shows a URL shows `mask_url(url)`, and text that
came from elsewhere (a driver's exception) goes through `scrub(text, url)` first.
"""
from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_PARAMS = {"password", "sslpassword"}


def _split(url: str):
    try:
        return urlsplit(url)
    except ValueError:
        return None


def mask_url(url: str) -> str:
    """The URL with any password replaced by `***` (in the user part and in query parameters)."""
    parts = _split(url)
    if parts is None or not parts.scheme:
        return url if "@" not in url and "password" not in url.lower() else f"<unparsable store URL: {MASK}>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostinfo}" if colon else f"{user}@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secrets(url: str) -> list[str]:
    parts = _split(url)
    if parts is None:
        return []
    found: list[str] = []
    if parts.password:
        found += [parts.password, unquote(parts.password)]
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() in _SECRET_PARAMS and value:
            found.append(value)
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """`text` with every occurrence of the URL (masked) and of its password (as `***`) taken out."""
    text = text.replace(url, mask_url(url))
    for secret in _secrets(url):
        text = text.replace(secret, MASK)
    return text


def with_database(url: str, database: str) -> str:
    """The same server, user and parameters, another database (for tests and benchmarks)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))
