"""The monitor: sampler with an injected fake NVML source and the real psutil source, the JSONL log (also after
SIGKILL), summary and timeline, the CLI without a GPU, SIGTERM, and the background-thread mode."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kolora_probe.monitor.recorder import (LiveView, Monitor, PsutilSource, Sample, SystemMemory, format_sample,
                                  read_samples, summarize_samples)
from kolora_probe.env.nvml import GpuSample, NvmlSource

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GIB = 2**30


class FakeNvml:
    """Two GPUs whose readings follow a script; ``fail_at`` makes one sample raise like a lost device."""

    def __init__(self, used: list[tuple[int, int]], fail_at: int | None = None, open_error: str | None = None):
        self.used = used
        self.calls = 0
        self.fail_at = fail_at
        self.open_error = open_error
        self.closed = False

    def open(self) -> str | None:
        return self.open_error

    def sample(self) -> list[GpuSample]:
        i = self.calls
        self.calls += 1
        if i == self.fail_at:
            raise RuntimeError("GPU is lost")
        u0, u1 = self.used[min(i, len(self.used) - 1)]
        return [GpuSample(0, "Fake H100", u0, 80 * GIB, utilization_percent=10.0 * i, temperature_c=40.0 + i,
                          power_w=100.0 + i, processes=[{"pid": 42, "used_memory_bytes": u0 // 2}]),
                GpuSample(1, "Fake L4", u1, 24 * GIB, utilization_percent=None, temperature_c=None, power_w=None)]

    def close(self) -> None:
        self.closed = True


class FakeSystem:
    def __init__(self, used: list[int]):
        self.used = used
        self.i = 0

    def sample(self) -> SystemMemory:
        u = self.used[min(self.i, len(self.used) - 1)]
        self.i += 1
        return SystemMemory(64 * GIB, u, 64 * GIB - u, process_rss_bytes=u // 4)


class Clock:
    def __init__(self):
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_fake_nvml_samples_give_peaks_means_and_a_valid_log(tmp_path):
    gpu = FakeNvml([(1 * GIB, 5 * GIB), (7 * GIB, 2 * GIB), (3 * GIB, 3 * GIB)])
    m = Monitor(tmp_path, 1.0, gpu_source=gpu, system_source=FakeSystem([4 * GIB, 10 * GIB, 6 * GIB]),
                clock=Clock())
    for _ in range(3):
        m.sample_once()
    summary = m.finish()

    assert summary.sample_count == 3 and summary.gpu_unavailable_reason is None
    g0, g1 = summary.gpus
    assert (g0.name, g0.memory_used_bytes.peak, g0.memory_used_bytes.mean) == ("Fake H100", 7 * GIB, 11 * GIB / 3)
    assert g0.memory_used_bytes.low == 1 * GIB and g0.memory_used_bytes.last == 3 * GIB
    assert (g0.utilization_percent.peak, g0.temperature_c.mean, g0.power_w.peak) == (20.0, 41.0, 102.0)
    assert g0.peak_process_memory_bytes == {"42": int(3.5 * GIB)}
    assert g1.memory_used_bytes.peak == 5 * GIB and g1.utilization_percent.peak is None
    assert summary.peak_gpu_memory_bytes == 7 * GIB
    assert summary.system.used_bytes.peak == 10 * GIB
    assert summary.system.available_bytes.low == 54 * GIB
    assert summary.duration_s == 2.0 and gpu.closed

    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["gpus"][0]["memory_used_bytes"] == GIB and first["system"]["used_bytes"] == 4 * GIB
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["peak_gpu_memory_bytes"] == 7 * GIB and written["sample_count"] == 3
    assert written["gpus"][1]["name"] == "Fake L4"
    assert (tmp_path / "timeline.png").read_bytes().startswith(PNG_MAGIC)
    # the log alone reproduces the summary (what is left after a kill)
    again = summarize_samples(read_samples(tmp_path / "samples.jsonl"))
    assert again.gpus == summary.gpus and again.system == summary.system


def test_real_psutil_source_reads_this_machine():
    s = PsutilSource().sample()
    assert 0 < s.used_bytes < s.total_bytes
    assert 0 < s.available_bytes <= s.total_bytes
    assert s.process_rss_bytes is not None and 0 < s.process_rss_bytes < s.total_bytes


def test_without_gpu_system_memory_is_still_monitored_and_the_reason_said_once(tmp_path):
    import io

    out = io.StringIO()
    gpu = FakeNvml([(0, 0)], open_error="NVML driver library (libnvidia-ml.so) not found")
    m = Monitor(tmp_path, 1.0, gpu_source=gpu, live=LiveView(out, tty=False))
    for _ in range(3):
        m.sample_once()
    summary = m.finish()
    assert gpu.calls == 0                      # an unusable source is never sampled
    assert summary.gpus == () and summary.gpu_unavailable_reason == "NVML driver library (libnvidia-ml.so) not found"
    assert summary.system is not None and summary.system.samples == 3
    text = out.getvalue()
    assert text.count("GPU figures unavailable") == 1 and "Traceback" not in text
    assert len([ln for ln in text.splitlines() if "RAM " in ln]) == 3
    assert (tmp_path / "timeline.png").read_bytes().startswith(PNG_MAGIC)


def test_a_failing_gpu_read_is_recorded_and_monitoring_continues(tmp_path):
    gpu = FakeNvml([(GIB, GIB)], fail_at=1)
    m = Monitor(tmp_path, 1.0, gpu_source=gpu, system_source=FakeSystem([GIB]), clock=Clock())
    samples = [m.sample_once() for _ in range(3)]
    assert [len(s.gpus) for s in samples] == [2, 0, 2]
    assert "GPU is lost" in samples[1].gpu_error
    assert m.finish().gpus[0].samples == 2


def test_history_is_thinned_but_the_summary_counts_every_sample():
    gpu = FakeNvml([(i * GIB, 0) for i in range(50)])
    m = Monitor(None, 1.0, gpu_source=gpu, system_source=FakeSystem([GIB]), max_history=8, clock=Clock())
    for _ in range(50):
        m.sample_once()
    s = m.summary()
    assert s.sample_count == 50 and s.gpus[0].memory_used_bytes.peak == 49 * GIB
    assert 4 <= len(m.history) <= 8 and m.history[0].gpus[0].memory_used_bytes == 0


def test_background_thread_mode(tmp_path):
    gpu = FakeNvml([(GIB, GIB)])
    m = Monitor(tmp_path, 0.05, gpu_source=gpu, system_source=FakeSystem([GIB])).start()
    deadline = time.monotonic() + 10
    while gpu.calls < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    summary = m.stop()
    assert summary.sample_count >= 3 and summary.stop_reason == "stopped"
    calls = gpu.calls
    time.sleep(0.15)
    assert gpu.calls == calls                   # the thread really stopped
    assert len(read_samples(tmp_path / "samples.jsonl")) == summary.sample_count
    assert m.stop() is summary                  # idempotent


def test_sample_round_trips_and_formats():
    s = Sample(1_700_000_000.0, 1.5, (GpuSample(0, "X", 2 * GIB, 8 * GIB, 50.0, 60.0, 70.0),),
               SystemMemory(16 * GIB, 4 * GIB, 12 * GIB, GIB))
    assert Sample.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    line = format_sample(s)
    assert "GPU0 2.00/8.00 GiB 50% 60°C 70W" in line and "RAM 4.00/16.00 GiB" in line and "\n" not in line


def test_invalid_interval_is_refused():
    with pytest.raises(ValueError, match="interval"):
        Monitor(None, 0)


# --- the real command, in subprocesses -------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kolora_probe", "monitor", *args]


def test_cli_runs_for_its_duration_without_a_gpu(tmp_path):
    out = tmp_path / "mon"
    r = subprocess.run(_cli("--interval", "1", "--duration", "5", "--output", str(out)), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    assert "Traceback" not in text
    samples = read_samples(out / "samples.jsonl")
    assert len(samples) == 6 and all(s.system is not None for s in samples)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sample_count"] == 6 and summary["stop_reason"] == "duration"
    assert (out / "timeline.png").read_bytes().startswith(PNG_MAGIC)
    if summary["gpu_unavailable_reason"]:   # this machine: no driver → exactly one clear line saying so
        notes = [ln for ln in text.splitlines() if "GPU figures unavailable" in ln]
        assert len(notes) == 1 and summary["gpu_unavailable_reason"] in notes[0]


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {n} lines")


def test_sigkill_mid_run_leaves_a_valid_jsonl(tmp_path):
    out = tmp_path / "mon"
    p = subprocess.Popen(_cli("--interval", "0.05", "--output", str(out)), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_lines(out / "samples.jsonl", 5, p)
    finally:
        p.kill()
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    raw = (out / "samples.jsonl").read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1].decode("utf-8").splitlines()
    assert len(complete) >= 5
    for line in complete:
        json.loads(line)                         # every complete line is valid JSON
    assert len(read_samples(out / "samples.jsonl")) == len(complete)
    assert not (out / "summary.json").exists()   # killed: no chance to summarise; the log is what remains


@pytest.mark.parametrize("sig, reason", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "interrupted (Ctrl-C)")])
def test_sigterm_and_ctrl_c_write_the_summary(tmp_path, sig, reason):
    out = tmp_path / "mon"
    p = subprocess.Popen(_cli("--interval", "0.1", "--output", str(out)), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lines(out / "samples.jsonl", 3, p)
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == reason and summary["sample_count"] >= 3
    assert summary["sample_count"] == len(read_samples(out / "samples.jsonl"))
    assert (out / "timeline.png").read_bytes().startswith(PNG_MAGIC)
    assert "Traceback" not in stdout + stderr


def test_python_dash_m_monitor_takes_the_same_options(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kolora_probe.monitor", "--interval", "0.2", "--duration", "0.2",
                        "--output", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(read_samples(tmp_path / "samples.jsonl")) == 2
    bad = subprocess.run([sys.executable, "-m", "kolora_probe.monitor", "--interval", "-1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--interval must be > 0" in bad.stderr and "Traceback" not in bad.stderr


def test_pytest_fixture_monitors_a_check_and_attaches_the_timeline(tmp_path):
    """checks/fixtures_monitor.py end to end: a check using ``gpu_monitor`` gets peak evidence in junit.xml and
    its timeline/summary/log under reports/monitor/<check>/."""
    check = tmp_path / "test_uses_monitor.py"
    check.write_text("import time\n"
                     "def test_allocates(gpu_monitor):\n"
                     "    assert gpu_monitor is not None\n"
                     "    block = bytearray(64 * 2**20)\n"
                     "    time.sleep(0.6)\n"
                     "    del block\n", encoding="utf-8")
    reports = tmp_path / "reports"
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", str(check),
                        "--reports-dir", str(reports), "--junitxml", str(tmp_path / "junit.xml"),
                        "--monitor-interval", "0.1", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    import xml.etree.ElementTree as ET

    props = {p.get("name"): p.get("value") for p in ET.parse(tmp_path / "junit.xml").iter("property")}
    assert int(props["monitor_samples"]) >= 3
    assert int(props["monitor_peak_process_rss_bytes"]) > 64 * 2**20   # saw the 64 MiB block
    assert "monitor_peak_gpu_memory_bytes" in props
    out = reports / "monitor" / "test_uses_monitor.py_test_allocates"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sample_count"] == int(props["monitor_samples"]) == len(read_samples(out / "samples.jsonl"))
    assert (out / "timeline.png").read_bytes().startswith(PNG_MAGIC)


# --- NvmlSource's mapping of the pynvml API, with an injected stand-in for the module --------------------
class FakePynvml:
    """The slice of pynvml that NvmlSource uses; device 1 supports neither utilisation, power nor temperature."""
    NVML_TEMPERATURE_GPU = 0

    class NVMLError_LibraryNotFound(Exception):
        pass

    class NVMLError_NotSupported(Exception):
        pass

    def __init__(self, devices=2, init_error=None):
        self.devices = devices
        self.init_error = init_error
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.devices

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3" if h == 0 else "NVIDIA L4"

    def nvmlDeviceGetMemoryInfo(self, h):
        from types import SimpleNamespace

        return SimpleNamespace(used=(h + 1) * GIB, total=80 * GIB, free=(79 - h) * GIB)

    def _only_device0(self, h, value):
        if h != 0:
            raise self.NVMLError_NotSupported("Not Supported")
        return value

    def nvmlDeviceGetUtilizationRates(self, h):
        from types import SimpleNamespace

        return self._only_device0(h, SimpleNamespace(gpu=87, memory=40))

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._only_device0(h, 71)

    def nvmlDeviceGetPowerUsage(self, h):
        return self._only_device0(h, 312_500)           # milliwatts

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        from types import SimpleNamespace

        return [SimpleNamespace(pid=1234, usedGpuMemory=GIB), SimpleNamespace(pid=99, usedGpuMemory=None)] \
            if h == 0 else []


def test_nvml_source_maps_every_field_and_tolerates_unsupported_ones():
    fake = FakePynvml()
    src = NvmlSource(fake)
    assert src.open() is None
    g0, g1 = src.sample()
    assert (g0.index, g0.name, g0.memory_used_bytes) == (0, "NVIDIA H100 80GB HBM3", GIB)
    assert g0.memory_total_bytes == 80 * GIB
    assert (g0.utilization_percent, g0.temperature_c, g0.power_w) == (87.0, 71.0, 312.5)
    assert g0.processes == [{"pid": 1234, "used_memory_bytes": GIB}, {"pid": 99, "used_memory_bytes": None}]
    assert (g1.name, g1.memory_used_bytes, g1.utilization_percent, g1.temperature_c, g1.power_w, g1.processes) == \
        ("NVIDIA L4", 2 * GIB, None, None, None, [])
    src.close()
    assert fake.shutdowns == 1


def test_nvml_source_says_why_gpu_figures_are_unavailable():
    no_lib = NvmlSource(FakePynvml(init_error=FakePynvml.NVMLError_LibraryNotFound("NVML Shared Library Not Found")))
    assert "libnvidia-ml.so" in no_lib.open() and "no NVIDIA driver" in no_lib.open()
    fake = FakePynvml(devices=0)
    no_device = NvmlSource(fake)
    assert "no GPU device" in no_device.open() and fake.shutdowns == 1
    # and the monitor built on it keeps sampling system memory
    m = Monitor(None, 1.0, gpu_source=NvmlSource(FakePynvml(devices=0)), system_source=FakeSystem([GIB]))
    s = m.sample_once()
    assert s.gpus == () and s.system is not None and "no GPU device" in m.summary().gpu_unavailable_reason


def test_real_nvml_source_on_this_machine_never_raises():
    src = NvmlSource()
    reason = src.open()
    try:
        if reason is None:                      # a machine with a driver and a GPU
            assert all(g.memory_total_bytes > 0 for g in src.sample())
        else:
            assert isinstance(reason, str) and reason
    finally:
        src.close()
