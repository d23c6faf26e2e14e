"""Environment: the libraries the plan needs are installed and consistent, and the kernels work on this machine."""
from __future__ import annotations

import platform

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from kolora_probe.env.facts import installed_version
from kolora_probe.env.bnb_roundtrip import KERNEL_MAX_RELATIVE_ERROR, NF4_MAX_RELATIVE_ERROR, nf4_round_trip
from kolora_probe.env.requirements import RequirementsFileError, check_dependency_graph, parse_requirements

pytestmark = pytest.mark.cpu


def test_requirement_installed(requirement, evidence):
    """Each package of requirements.txt is installed and satisfies its specifier."""
    if isinstance(requirement, RequirementsFileError):
        pytest.fail(str(requirement), pytrace=False)
    evidence(requirement.name, requirement.installed, expected=requirement.specifier or "any")
    assert requirement.satisfied, requirement.message


def test_dependency_graph_consistent(requirements_file, evidence):
    """Every Requires-Dist of the required packages (transitively) is installed and satisfied, like `pip check`."""
    try:
        edges = check_dependency_graph(requirements_file)
    except RequirementsFileError as exc:
        pytest.fail(str(exc), pytrace=False)
    broken = [e for e in edges if not e.satisfied]
    evidence("dependency_edges_checked", len(edges))
    evidence("dependency_edges_broken", [e.message for e in broken], expected=[])
    assert not broken, f"{len(broken)} broken dependencies: " + "; ".join(e.message for e in broken)


def test_python_version_supported(requirements_file, evidence):
    """This Python satisfies the Requires-Python of every required package."""
    try:
        reqs = parse_requirements(requirements_file)
    except RequirementsFileError as exc:
        pytest.fail(str(exc), pytrace=False)
    from importlib import metadata

    here = Version(platform.python_version())
    bad = []
    for _no, req in reqs:
        try:
            rp = metadata.metadata(req.name).get("Requires-Python")
        except metadata.PackageNotFoundError:
            continue
        if rp and here not in SpecifierSet(rp):
            bad.append(f"{req.name} needs Python {rp}")
    evidence("python_version", str(here))
    assert not bad, f"Python {here} is not supported: " + "; ".join(bad) + "; fix: use a Python they support"


def test_torch_build(environment_facts, evidence):
    """torch imports; its build (CPU or CUDA version) and CUDA availability are recorded."""
    t = environment_facts.torch
    evidence("torch_version", t.version)
    evidence("torch_cuda_build", t.cuda_build or "cpu-only")
    evidence("cuda_available", t.cuda_available)
    evidence("cuda_device_count", t.device_count)
    assert t.error is None, f"torch cannot be imported: {t.error}; fix: pip install -r requirements.txt"


def test_bitsandbytes_imports(environment_facts, evidence):
    """bitsandbytes imports and reports which backends have 4-bit kernels."""
    b = environment_facts.bitsandbytes
    evidence("bitsandbytes_version", b.version)
    evidence("bitsandbytes_backends", list(b.backends))
    assert b.importable, f"{b.error}; QLoRA (4-bit/8-bit) cannot run"
    assert "cpu" in b.backends or "cuda" in b.backends, f"bitsandbytes {b.version} has no usable backend"


def test_bitsandbytes_nf4_round_trip_cpu(environment_facts, evidence):
    """A real NF4 quantize → 4-bit matmul → dequantize on the CPU agrees with fp32 within tolerance."""
    if not environment_facts.bitsandbytes.importable:
        pytest.fail(f"bitsandbytes is not usable: {environment_facts.bitsandbytes.error}", pytrace=False)
    r = nf4_round_trip("cpu")
    evidence("nf4_quantization_error", r.quantization_error, expected=f"<= {NF4_MAX_RELATIVE_ERROR}")
    evidence("nf4_kernel_error", r.kernel_error, expected=f"<= {KERNEL_MAX_RELATIVE_ERROR}")
    assert r.error is None, f"NF4 round trip on CPU raised {r.error}"
    assert r.kernel_error <= KERNEL_MAX_RELATIVE_ERROR, (
        f"bitsandbytes 4-bit matmul disagrees with the dequantized matmul: {r.kernel_error:.3g} > "
        f"{KERNEL_MAX_RELATIVE_ERROR}; the CPU kernel is broken, reinstall bitsandbytes")
    assert r.quantization_error <= NF4_MAX_RELATIVE_ERROR, (
        f"NF4 error {r.quantization_error:.3g} > {NF4_MAX_RELATIVE_ERROR} (expected ~0.09)")


def test_peft_importable(library_imports, evidence):
    """PEFT, transformers and accelerate import together (their versions and import seconds are recorded)."""
    for lib in library_imports:
        evidence(f"{lib.name}_version", lib.version)
        evidence(f"{lib.name}_import_seconds", round(lib.seconds, 3), unit="s")
    broken = [f"import {lib.name} failed ({lib.error})" for lib in library_imports if lib.error]
    assert not broken, "; ".join(broken) + "; fix: pip install -r requirements.txt"
