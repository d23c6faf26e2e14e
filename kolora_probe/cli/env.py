"""``kolora-probe env``: the machine's facts (and the requirements' status) for humans or as JSON."""
from __future__ import annotations

import argparse
from pathlib import Path

from kolora_probe.report import strict_json

HELP = "print the environment facts (Python, torch/CUDA, GPUs via NVML, bitsandbytes, packages)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (for tools and for pasting into an issue)")
    p.add_argument("--requirements", default=None,
                   help="requirements file to verify (default: requirements.txt of the kolora-probe checkout, "
                        "or ./requirements.txt)")


def _default_requirements() -> Path | None:
    for cand in (Path.cwd() / "requirements.txt", Path(__file__).resolve().parents[2] / "requirements.txt"):
        if cand.is_file():
            return cand
    return None


def run(args: argparse.Namespace) -> int:
    from kolora_probe.env.facts import collect_environment, cuda_unavailable_reason
    from kolora_probe.report.redact import redact
    from kolora_probe.env.requirements import RequirementsFileError, check_requirements

    facts = collect_environment()
    req_path = Path(args.requirements) if args.requirements else _default_requirements()
    reqs, req_error = [], None
    if req_path is not None:
        try:
            reqs = check_requirements(req_path)
        except RequirementsFileError as exc:
            req_error = str(exc)
    doc = facts.to_dict()
    doc["cuda_unavailable_reason"] = cuda_unavailable_reason(facts.torch)
    doc["requirements"] = {"file": str(req_path) if req_path else None, "error": req_error,
                           "packages": [{"name": r.name, "specifier": r.specifier, "installed": r.installed,
                                         "satisfied": r.satisfied} for r in reqs]}
    doc = redact(doc)
    if args.json:
        print(strict_json.dumps(doc, indent=2, ensure_ascii=False, default=str))
    else:
        t, b, n = facts.torch, facts.bitsandbytes, facts.nvml
        print(f"Python      {facts.python_version} ({facts.python_executable})")
        print(f"Platform    {facts.platform}")
        print(f"torch       {t.version} (CUDA build: {t.cuda_build or 'none, CPU-only'}; cuda available: {t.cuda_available})")
        for g in t.gpus:
            print(f"  GPU {g.index}     {g.name}, {g.total_memory_bytes / 2**30:.1f} GiB, cc {g.compute_capability[0]}."
                  f"{g.compute_capability[1]}, bf16 {g.bf16_supported}")
        if doc["cuda_unavailable_reason"]:
            print(f"  no GPU:   {doc['cuda_unavailable_reason']}")
        print("NVML        " + (f"driver {n.driver_version}, CUDA driver {n.cuda_driver_version}, "
                                 f"{len(n.devices)} device(s)" if n.available else f"unavailable: {n.error}"))
        print(f"bitsandbytes {b.version} " + (f"backends {', '.join(b.backends)}" if b.importable else f"({b.error})"))
        for name, v in facts.packages.items():
            print(f"  {name:<18} {v or 'not installed'}")
        if req_error:
            print(f"requirements: {req_error}")
        bad = [r for r in reqs if not r.satisfied]
        if reqs:
            print(f"requirements {req_path}: {len(reqs) - len(bad)}/{len(reqs)} satisfied")
            for r in bad:
                print(f"  FAIL {r.message}")
    return 1 if req_error or any(not r.satisfied for r in reqs) else 0
