"""How long the CPU gate takes, against the cheapest thing a user could run instead, paired in one run.

Three pairs, each measured alternately (A B A B …) so that a loaded machine slows both sides alike:

* ``gate (weights)`` – ``pytest`` on a full-size KoGPT-2-shaped checkpoint with random weights (safetensors,
  ~500 MB, built here in a temp dir with the test zoo's Korean tokenizer) vs one bare
  ``AutoModelForCausalLM.from_pretrained`` of the same directory. The random weights make the agreement check
  fail (exit 1): that is the expected verdict, and deciding it costs as much as deciding a pass.
* ``gate (config only)`` – ``pytest`` on the full-size ``config.json`` alone (no weights, no tokenizer) vs
  ``python -c "import transformers, peft"``.
* ``estimate <plan>`` – ``kolora-probe estimate`` on each shipped plan (``--model`` = the same config) vs the import.

Each command runs in a fresh interpreter (``subprocess`` + ``os.wait4`` in a small launcher, so that peak RSS is
the command's own): wall seconds, CPU seconds (user + sys) and peak RSS of that process. Results: ``benchmarks/results/gate_speed.json`` and a table on stdout.

usage: python benchmarks/gate_speed.py [--reps 3] [--only weights,config,estimate] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
PLANS = sorted((ROOT / "plans").glob("*.toml"))


def build_checkpoint(target: Path, zoo) -> Path:
    """Full-size KoGPT-2 architecture, random weights, safetensors, plus the zoo's Korean tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from model_factory import KOGPT2_CONFIG

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**KOGPT2_CONFIG))
    model.save_pretrained(target, safe_serialization=True)
    shutil.copy(zoo.tiny / "tokenizer.json", target / "tokenizer.json")
    return target


# The command runs under a small launcher that measures it: a process's peak RSS (ru_maxrss) starts from its
# parent's at exec on Linux, so a child of this (torch-importing) script would report at least our own RSS.
LAUNCHER = ("import json, os, subprocess, sys, time; t0 = time.perf_counter(); "
            "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); _, st, ru = os.wait4(p.pid, 0); "
            "print(json.dumps([time.perf_counter() - t0, os.waitstatus_to_exitcode(st), "
            "ru.ru_utime + ru.ru_stime, ru.ru_maxrss]))")


def run_once(argv: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    wall, rc, cpu, maxrss_kib = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "max_rss_mib": round(maxrss_kib / 1024, 1),
            "rc": rc, **({"stderr_tail": proc.stderr[-400:]} if rc not in (0, 1) else {})}


def median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="pairs per comparison (default 3)")
    ap.add_argument("--only", default="weights,config,estimate", help="comma list of weights, config, estimate")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gate_speed.json")
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}

    from model_factory import model_zoo

    zoo = model_zoo()
    py = sys.executable
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="kolora-gate-speed-"))
    try:
        pairs: list[tuple[str, list[str], str, list[str]]] = []
        gate = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--reports-dir={tmp / 'reports'}"]
        importing = [py, "-c", "import transformers, peft"]
        if "weights" in only:
            ckpt = build_checkpoint(tmp / "kogpt2-random", zoo)
            load = [py, "-c", "import sys; from transformers import AutoModelForCausalLM; "
                              "AutoModelForCausalLM.from_pretrained(sys.argv[1])", str(ckpt)]
            pairs.append(("gate (weights)", gate + [f"--model={ckpt}"], "one from_pretrained", load))
        if "config" in only:
            pairs.append(("gate (config only)", gate + [f"--model={zoo.full_config}"],
                          "import transformers, peft", importing))
        if "estimate" in only:
            for plan in PLANS:
                pairs.append((f"estimate {plan.name}", [py, "-m", "kolora_probe", "estimate", f"--plan={plan}",
                                                         f"--model={zoo.full_config}"],
                              "import transformers, peft", importing))

        results = []
        for name, a, ref_name, b in pairs:
            runs_a, runs_b = [], []
            for _ in range(args.reps):
                runs_a.append(run_once(a, env))
                runs_b.append(run_once(b, env))
            row = {"name": name, "reference": ref_name, "command": a[1:], "reference_command": b[1:],
                   "runs": runs_a, "reference_runs": runs_b}
            for key in ("wall_s", "cpu_s", "max_rss_mib"):
                row[f"median_{key}"] = median(runs_a, key)
                row[f"reference_median_{key}"] = median(runs_b, key)
                row[f"ratio_{key}"] = round(row[f"median_{key}"] / max(row[f"reference_median_{key}"], 1e-9), 2)
            row["exit_codes"] = sorted({r["rc"] for r in runs_a})
            results.append(row)
            print(f"  {name}: {row['median_wall_s']} s vs {row['reference_median_wall_s']} s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    doc = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                       "load_average_at_end": list(os.getloadavg())},
           "reps": args.reps, "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    return 0


def table(results: list[dict]) -> str:
    lines = ["| measured | median wall s | reference | median wall s | wall ratio | CPU ratio | RSS MiB (ratio) "
             "| exit |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {r['name']} | {r['median_wall_s']:.1f} | {r['reference']} | "
                     f"{r['reference_median_wall_s']:.1f} | {r['ratio_wall_s']:.2f}× | {r['ratio_cpu_s']:.2f}× | "
                     f"{r['median_max_rss_mib']:,.0f} ({r['ratio_max_rss_mib']:.1f}×) | "
                     f"{','.join(map(str, r['exit_codes']))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
