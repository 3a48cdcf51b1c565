"""Credentials out of URIs before they are printed or logged: ``redact_uri``.

A tracking URI such as ``postgresql://user:secret@db:5432/mlflow`` or an S3/HTTP URI with
``user:password@`` carries its credentials in the clear; anything shown to a person (CLI output,
logs, the service's banner) goes through :func:`redact_uri` first.
"""
from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_PARAMS = ("password", "passwd", "pwd", "secret", "token", "key", "signature", "credential")


def _secret_param(name: str) -> bool:
    low = name.lower()
    return any(word in low for word in SECRET_PARAMS)


def redact_uri(uri: str | None) -> str | None:
    """``uri`` with any ``user:password@`` replaced by ``***@`` and secret-looking query values by ``***``.

    Paths and plain URIs come back unchanged; ``None`` stays ``None``.
    """
    if not uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return MASK  # not parseable: show nothing rather than a secret
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret_param(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _secret_param(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
