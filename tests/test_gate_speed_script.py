"""benchmarks/gate_speed.py's measuring parts (the benchmark itself is run by hand: no timed tests)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gate_speed  # noqa: E402


def test_run_once_reports_the_childs_own_resources():
    env = dict(os.environ)
    big = gate_speed.run_once([sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
                              env)
    small = gate_speed.run_once([sys.executable, "-c", "pass"], env)
    assert big["rc"] == small["rc"] == 0 and big["wall_s"] > 0
    assert big["max_rss_mib"] > small["max_rss_mib"] + 150          # per child (wait4), not the max of all children
    failed = gate_speed.run_once([sys.executable, "-c", "import sys; sys.exit(3)"], env)
    assert failed["rc"] == 3 and "stderr_tail" in failed


def test_table_has_one_row_per_comparison():
    row = {"name": "gate (weights)", "reference": "one from_pretrained", "median_wall_s": 30.0,
           "reference_median_wall_s": 10.0, "ratio_wall_s": 3.0, "ratio_cpu_s": 2.5, "median_max_rss_mib": 1500.0,
           "ratio_max_rss_mib": 1.4, "exit_codes": [1]}
    lines = gate_speed.table([row, {**row, "name": "gate (config only)"}]).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| gate (weights) | 30.0 | one from_pretrained | 10.0 | 3.00× |")
