"""GPU readiness (``pytest -m gpu``): on a machine without a usable CUDA GPU every check here FAILS with why."""
from __future__ import annotations

import pytest

from kolora_probe.env.nvml import read_nvml
from kolora_probe.env.bnb_roundtrip import KERNEL_MAX_RELATIVE_ERROR, NF4_MAX_RELATIVE_ERROR, nf4_round_trip

pytestmark = pytest.mark.gpu

MIN_CC_FOR_QUANTIZATION = (7, 5)  # bitsandbytes 4-bit/8-bit CUDA kernels


@pytest.fixture(scope="module")
def nvml_facts(cuda_device):
    facts = read_nvml()
    if not facts.available:
        pytest.fail(f"NVML unavailable: {facts.error}", pytrace=False)
    return facts


def test_cuda_device_usable(cuda_device, environment_facts, evidence):
    t = environment_facts.torch
    evidence("torch_cuda_build", t.cuda_build)
    evidence("gpus", [g.name for g in t.gpus])
    assert t.device_count >= 1


def test_nvml_and_torch_see_same_devices(nvml_facts, environment_facts, evidence):
    torch_uuids = sorted(str(g.uuid).removeprefix("GPU-") for g in environment_facts.torch.gpus)
    nvml_uuids = sorted(d.uuid.removeprefix("GPU-") for d in nvml_facts.devices)
    evidence("nvml_devices", [d.name for d in nvml_facts.devices])
    evidence("torch_devices", [g.name for g in environment_facts.torch.gpus])
    if all(torch_uuids):
        assert set(torch_uuids) <= set(nvml_uuids), (
            f"torch sees GPUs {torch_uuids} that NVML does not list ({nvml_uuids}); check CUDA_VISIBLE_DEVICES")
    else:
        assert len(environment_facts.torch.gpus) <= len(nvml_facts.devices)


def test_driver_version(nvml_facts, evidence):
    evidence("driver_version", nvml_facts.driver_version)
    evidence("cuda_driver_version", nvml_facts.cuda_driver_version)
    assert nvml_facts.driver_version, "NVML reports no driver version"


def test_compute_capability_for_quantization(cuda_device, environment_facts, plan, evidence):
    cc = environment_facts.torch.gpus[0].compute_capability
    evidence("compute_capability", f"{cc[0]}.{cc[1]}",
             expected=f">= {MIN_CC_FOR_QUANTIZATION[0]}.{MIN_CC_FOR_QUANTIZATION[1]}"
             if plan.training.quantization != "none" else "any")
    if plan.training.quantization != "none":
        assert tuple(cc) >= MIN_CC_FOR_QUANTIZATION, (
            f"plan quantizes ({plan.training.quantization}) but GPU compute capability {cc[0]}.{cc[1]} < 7.5; "
            "fix: use a newer GPU or set [training].quantization = \"none\"")


def test_bf16_supported_when_planned(cuda_device, environment_facts, plan, evidence):
    wants = "bf16" in (plan.training.dtype, plan.training.weights_dtype)
    g = environment_facts.torch.gpus[0]
    evidence("bf16_supported", g.bf16_supported, expected=True if wants else "any")
    if wants:
        assert g.bf16_supported, (f"plan uses bf16 but {g.name} does not support it; "
                                  "fix: set [training].dtype = \"fp16\" (and weights_dtype)")


def test_free_memory_covers_budget(nvml_facts, plan, evidence):
    free = nvml_facts.devices[0].memory_free_bytes
    evidence("gpu_free_memory_bytes", free, expected=f">= {plan.budget_bytes}", unit="bytes")
    assert free >= plan.budget_bytes, (
        f"GPU 0 has {free / 2**30:.2f} GiB free < plan budget {plan.budget.gpu_memory_gib:g} GiB; "
        "fix: free the GPU (other processes) or lower [budget].gpu_memory_gib and the batch size")


def test_bitsandbytes_nf4_round_trip_cuda(cuda_device, evidence):
    r = nf4_round_trip("cuda", dtype="bf16")
    evidence("nf4_quantization_error", r.quantization_error, expected=f"<= {NF4_MAX_RELATIVE_ERROR}")
    evidence("nf4_kernel_error", r.kernel_error, expected=f"<= {KERNEL_MAX_RELATIVE_ERROR}")
    assert r.error is None, f"NF4 round trip on CUDA raised {r.error}; fix: install a bitsandbytes build for this CUDA"
    assert r.kernel_error <= KERNEL_MAX_RELATIVE_ERROR
    assert r.quantization_error <= NF4_MAX_RELATIVE_ERROR
