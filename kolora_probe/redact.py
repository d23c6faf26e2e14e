"""Redaction of secrets (tokens, keys, passwords) from anything written to a report."""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH)", re.I)
# Hugging Face user/org tokens and common bearer-token shapes, even when not in the environment.
SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|api_org_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,})\b")
MASK = "***REDACTED***"
_MIN_SECRET_LEN = 6  # shorter values are too likely to match ordinary text


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look secret (HF_TOKEN, *_API_KEY, ...), longest first."""
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if SECRET_NAME.search(k) and v and len(v) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """Replace every secret value and token-shaped string in ``text`` by a mask."""
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, MASK)
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
