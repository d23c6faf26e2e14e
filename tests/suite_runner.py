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


# LoRA r=16 on lm_head of the tiny model (n_embd 64, vocab 1600): 16 * (64 + 1600) = 26,624 trainable.
TINY_LM_HEAD_R16 = 16 * (64 + 1600)
TINY_SEQ = "--seq-len=128"     # the tiny model's n_positions: the default plan's 512 is a plan it cannot run
_GATE_RUNS: dict[tuple, SuiteRun] = {}


def gate_run(model_dir: Path | str, *extra: str, env: dict[str, str] | None = None) -> SuiteRun:
    """The whole CPU gate (``pytest checks``) on a tiny test model (tests/model_factory.py) with the plan's count
    and sequence length set for it, run once per distinct arguments in a test session and shared by every test
    that reads it (test_faults, test_tokenizer, test_model_loading): each run costs seconds on 2 cores."""
    key = (str(model_dir), extra, tuple(sorted((env or {}).items())))
    if key not in _GATE_RUNS:
        import tempfile

        reports = Path(tempfile.mkdtemp(prefix="kolora-gate-run-"))
        _GATE_RUNS[key] = run_suite("checks", f"--model={model_dir}", f"--expected-trainable={TINY_LM_HEAD_R16}",
                                    TINY_SEQ, *extra, reports=reports, env=env)
    return _GATE_RUNS[key]


def run_cli(*args: str, offline: bool = True) -> subprocess.CompletedProcess:
    """``kolora-probe ARGS`` run in this process through the entry point's own function (``kolora_probe.cli.main.main``),
    offline, in the repo root, with stdout/stderr captured: the same code, exit code and output as the console
    script, without a new interpreter importing torch and transformers again (seconds per call on 2 cores). Each
    CLI test module still runs one call as a real subprocess. ``offline=False`` leaves huggingface_hub's settings
    as the caller made them."""
    import contextlib
    import io

    from huggingface_hub import constants

    from kolora_probe.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    saved = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    if offline:
        constants.HF_HUB_OFFLINE, os.environ["HF_HUB_OFFLINE"] = True, "1"
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:          # argparse errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if saved[1] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[1]
    return subprocess.CompletedProcess(["kolora-probe", *args], code, out.getvalue(), err.getvalue())


def documented(fragment: str) -> None:
    """The README's "When a check fails" table lists this message fragment, so the section stays true."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## When a check fails", 1)[1].split("\n## ", 1)[0]
    assert f"| `{fragment}` |" in section, f"README 'When a check fails' does not list {fragment!r}"
