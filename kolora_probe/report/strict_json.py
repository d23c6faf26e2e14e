"""Strict JSON for every file and ``--json`` output kolora-probe writes: never the bare ``NaN`` / ``Infinity``
tokens that Python's json module emits by default (they are not JSON; other parsers reject the whole file).

A non-finite float that still reaches a report (a NaN loss from broken weights, say) is written as the string
``"nan"``, ``"inf"`` or ``"-inf"``, so the report stays readable and says what was measured.
"""
from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (also in nested dicts, lists and tuples) replaced by its name."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` with ``allow_nan=False`` after :func:`finite` (``default=`` results are checked too)."""
    default = kwargs.pop("default", None)
    if default is not None:
        kwargs["default"] = lambda o: finite(default(o))
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
