"""Run the real kolora-probe suite (``python -m pytest`` in the repo root) in a subprocess and read its reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class SuiteRun:
    returncode: int
    output: str
    reports: Path

    @property
    def environment(self) -> dict[str, Any]:
        return json.loads((self.reports / "environment.json").read_text(encoding="utf-8"))

    @property
    def junit(self) -> ET.Element:
        return ET.parse(self.reports / "junit.xml").getroot()

    @property
    def html(self) -> str:
        return (self.reports / "report.html").read_text(encoding="utf-8")

    def outcome(self, nodeid_part: str) -> dict[str, Any]:
        matches = [c for c in self.environment["checks"] if nodeid_part in c["nodeid"]]
        assert matches, f"no check matching {nodeid_part!r} in environment.json"
        return matches[0]

    def outcomes(self) -> dict[str, str]:
        return {c["nodeid"]: c["outcome"] for c in self.environment["checks"]}


def run_suite(*args: str, reports: Path, env: dict[str, str] | None = None, timeout: float = 600,
              cwd: Path = ROOT, no_reports_dir: bool = False) -> SuiteRun:
    """``no_reports_dir``: leave out ``--reports-dir`` (the reports go to the repository's reports/<selection>/)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           *([] if no_reports_dir else [f"--reports-dir={reports}"]), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    return SuiteRun(proc.returncode, proc.stdout + proc.stderr, reports)


def documented(fragment: str) -> None:
    """The README's "When a check fails" table lists this message fragment, so the section stays true."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## When a check fails", 1)[1].split("\n## ", 1)[0]
    assert f"| `{fragment}` |" in section, f"README 'When a check fails' does not list {fragment!r}"
