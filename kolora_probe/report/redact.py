"""Redaction of secrets (tokens, keys, passwords, URL credentials) from anything written to a report or printed.

A secret is the value of an environment variable whose name says token/secret/password/key/auth/credential, a
token-shaped string (``hf_…``, ``ghp_…``, ``sk-…``), or the ``user:password@`` part of a URL. The report writers
escape text (HTML, XML, JSON), so :func:`redact_text` also replaces each secret's escaped forms: a secret holding
``& < > "`` or Korean is masked whichever writer escaped it.
"""
from __future__ import annotations

import html
import json
import os
import re
from typing import Any, Mapping
from urllib.parse import quote

SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH"
                         r"|(^|_)KEY($|_))", re.I)
# Hugging Face user/org tokens and common bearer-token shapes, even when not in the environment.
SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|api_org_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,})\b")
# user:password@ (or a lone token@) after a URL scheme; the host stays readable.
URL_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*:/{1,3})[^\s/@\"'<>]+@")  # also https:/ after path normalising
MASK = "***REDACTED***"
_MIN_SECRET_LEN = 6  # shorter values are too likely to match ordinary text


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look secret (HF_TOKEN, *_API_KEY, ...), longest first."""
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if SECRET_NAME.search(k) and v and len(v) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def escaped_forms(value: str) -> set[str]:
    """``value`` as the report writers may have written it: raw, JSON-escaped (ASCII or not), HTML/XML-escaped
    (with and without quotes, ``&quot;`` or ``&#34;``), both layered (a JSON blob inside an HTML attribute) and
    percent-encoded."""
    json_forms = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    out: set[str] = set()
    for j in json_forms:
        for h in (j, html.escape(j, quote=True), html.escape(j, quote=False)):
            out |= {h, h.replace("&quot;", "&#34;").replace("&#x27;", "&#39;"), h.replace("&#x27;", "'")}
    out.add(quote(value, safe=""))
    return {v for v in out if v}


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """Replace every secret value (in any escaped form), URL credential and token-shaped string by a mask."""
    forms: set[str] = set()
    for value in secret_values() if secrets is None else secrets:
        forms |= escaped_forms(value)
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MASK)
    text = URL_USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    return SECRET_VALUE.sub(MASK, text)


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """Redact recursively inside dicts/lists/tuples of JSON-like data."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, Mapping):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    return obj
