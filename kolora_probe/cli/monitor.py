"""``kolora-probe monitor``: watch GPU (NVML) and system memory until Ctrl-C, SIGTERM or ``--duration``.

Writes ``samples.jsonl`` (one flushed JSON line per sample), ``summary.json`` and ``timeline.png`` into
``--output``. The work is done by :mod:`kolora_probe.monitor.recorder` (stdlib-only at import time, so ``--help`` stays
instant); ``python -m kolora_probe.monitor.recorder`` takes the same options.
"""
from __future__ import annotations

from kolora_probe.monitor.recorder import HELP, add_arguments, run

__all__ = ["HELP", "add_arguments", "run"]
