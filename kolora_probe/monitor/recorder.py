"""GPU and system memory monitor: samples, history, a crash-safe JSONL log, a summary and a timeline.

The sampler takes its readings from two injected sources:

* a :class:`GpuSource` — the real one is :class:`kolora_probe.env.nvml.NvmlSource` (``nvidia-ml-py``: used/total
  memory, utilisation, temperature, power and per-process memory of every GPU); tests inject a fake;
* a :class:`SystemSource` — the real one is :class:`PsutilSource` (used/total/available RAM, process RSS).

:class:`Monitor` keeps the history, appends every sample as one JSON line to ``samples.jsonl`` (written with one
``os.write`` and ``fsync``-ed, so a crash or SIGKILL loses at most the sample being written and every complete line
is valid JSON), and on stop writes ``summary.json`` (peaks and means per device and for system memory) and
``timeline.png``. Without NVML or a GPU it keeps monitoring system memory; :attr:`Monitor.gpu_unavailable_reason`
says why GPU figures are missing (no driver library, no device) and the live view says it once.

Run it as ``kolora-probe monitor`` or ``python -m kolora_probe.monitor.recorder`` (same options), or in a background thread
with :meth:`Monitor.start` / :meth:`Monitor.stop` (the pytest fixture does that).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Protocol

from kolora_probe.env.nvml import GpuSample, NvmlSource, nvml_error_reason

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
TIMELINE_FILE = "timeline.png"
GIB = 2**30


# --- samples ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SystemMemory:
    """System RAM and the watched process's resident set size, in bytes."""
    total_bytes: int
    used_bytes: int
    available_bytes: int
    process_rss_bytes: int | None = None


@dataclass(frozen=True)
class Sample:
    """One reading of every GPU and of system memory.

    ``time`` is the wall clock (Unix seconds); ``elapsed_s`` counts from the monitor's start. ``gpus`` is empty
    when GPU figures are unavailable; ``gpu_error`` then says why (only when reading failed during this sample).
    """
    time: float
    elapsed_s: float
    gpus: tuple[GpuSample, ...] = ()
    system: SystemMemory | None = None
    gpu_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"time": round(self.time, 3), "elapsed_s": round(self.elapsed_s, 3),
                "gpus": [asdict(g) for g in self.gpus],
                "system": asdict(self.system) if self.system else None,
                "gpu_error": self.gpu_error}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        gpus = tuple(GpuSample(**{**g, "processes": list(g.get("processes") or [])}) for g in d.get("gpus") or [])
        system = SystemMemory(**d["system"]) if d.get("system") else None
        return cls(float(d["time"]), float(d["elapsed_s"]), gpus, system, d.get("gpu_error"))


# --- sources ----------------------------------------------------------------------------------------------
class GpuSource(Protocol):
    """Where GPU readings come from. ``open`` returns None when usable, else why GPU figures are unavailable."""

    def open(self) -> str | None: ...

    def sample(self) -> list[GpuSample]: ...

    def close(self) -> None: ...


class SystemSource(Protocol):
    def sample(self) -> SystemMemory: ...


class PsutilSource:
    """System memory (``psutil.virtual_memory``) and the RSS of one process (default: this one)."""

    def __init__(self, pid: int | None = None) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process(pid)

    def sample(self) -> SystemMemory:
        vm = self._psutil.virtual_memory()
        try:
            rss = int(self._process.memory_info().rss)
        except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
            rss = None
        return SystemMemory(int(vm.total), int(vm.used), int(vm.available), rss)


# --- summary ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """Highest, mean, last and lowest value of one series (None when the series had no values)."""
    peak: float | None
    mean: float | None
    last: float | None
    low: float | None = None


@dataclass(frozen=True)
class GpuSummary:
    index: int
    name: str
    memory_total_bytes: int
    samples: int
    memory_used_bytes: Stat
    utilization_percent: Stat
    temperature_c: Stat
    power_w: Stat
    peak_process_memory_bytes: dict[str, int] = field(default_factory=dict)  # pid → peak bytes


@dataclass(frozen=True)
class SystemSummary:
    total_bytes: int
    samples: int
    used_bytes: Stat
    available_bytes: Stat      # ``low`` is the tightest moment
    process_rss_bytes: Stat


@dataclass(frozen=True)
class MonitorSummary:
    started_at: str | None
    ended_at: str | None
    duration_s: float
    interval_s: float
    sample_count: int
    gpu_unavailable_reason: str | None
    gpus: tuple[GpuSummary, ...] = ()
    system: SystemSummary | None = None
    stop_reason: str = "stopped"
    files: dict[str, str] = field(default_factory=dict)

    @property
    def peak_gpu_memory_bytes(self) -> int | None:
        peaks = [g.memory_used_bytes.peak for g in self.gpus if g.memory_used_bytes.peak is not None]
        return int(max(peaks)) if peaks else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_gpu_memory_bytes"] = self.peak_gpu_memory_bytes
        return d


class _Acc:
    """Running peak/mean/last/low of one series; None values are skipped."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.high: float | None = None
        self.low: float | None = None
        self.last: float | None = None

    def add(self, v: float | None) -> None:
        if v is None:
            return
        self.n += 1
        self.total += v
        self.last = v
        self.high = v if self.high is None else max(self.high, v)
        self.low = v if self.low is None else min(self.low, v)

    def stat(self) -> Stat:
        return Stat(self.high, (self.total / self.n) if self.n else None, self.last, self.low)


class _GpuAcc:
    def __init__(self, g: GpuSample) -> None:
        self.index, self.name, self.total = g.index, g.name, g.memory_total_bytes
        self.n = 0
        self.used, self.util, self.temp, self.power = _Acc(), _Acc(), _Acc(), _Acc()
        self.procs: dict[str, int] = {}

    def add(self, g: GpuSample) -> None:
        self.n += 1
        self.name, self.total = g.name, g.memory_total_bytes
        self.used.add(g.memory_used_bytes)
        self.util.add(g.utilization_percent)
        self.temp.add(g.temperature_c)
        self.power.add(g.power_w)
        for p in g.processes:
            b = p.get("used_memory_bytes")
            if b is not None:
                key = str(p.get("pid"))
                self.procs[key] = max(self.procs.get(key, 0), int(b))

    def summary(self) -> GpuSummary:
        return GpuSummary(self.index, self.name, self.total, self.n, self.used.stat(), self.util.stat(),
                          self.temp.stat(), self.power.stat(), dict(self.procs))


class SummaryBuilder:
    """Folds samples into a :class:`MonitorSummary` incrementally (so the history may be thinned out)."""

    def __init__(self, interval_s: float, gpu_unavailable_reason: str | None = None) -> None:
        self.interval_s = interval_s
        self.gpu_unavailable_reason = gpu_unavailable_reason
        self.count = 0
        self.first: Sample | None = None
        self.last: Sample | None = None
        self.gpus: dict[int, _GpuAcc] = {}
        self.sys_total = 0
        self.sys_n = 0
        self.sys_used, self.sys_avail, self.rss = _Acc(), _Acc(), _Acc()

    def add(self, s: Sample) -> None:
        self.count += 1
        self.first = self.first or s
        self.last = s
        for g in s.gpus:
            self.gpus.setdefault(g.index, _GpuAcc(g)).add(g)
        if s.system is not None:
            self.sys_n += 1
            self.sys_total = s.system.total_bytes
            self.sys_used.add(s.system.used_bytes)
            self.sys_avail.add(s.system.available_bytes)
            self.rss.add(s.system.process_rss_bytes)

    def build(self, stop_reason: str = "stopped", files: dict[str, str] | None = None) -> MonitorSummary:
        system = (SystemSummary(self.sys_total, self.sys_n, self.sys_used.stat(), self.sys_avail.stat(),
                                self.rss.stat()) if self.sys_n else None)
        return MonitorSummary(
            started_at=_iso(self.first.time) if self.first else None,
            ended_at=_iso(self.last.time) if self.last else None,
            duration_s=round(self.last.time - self.first.time, 3) if self.first and self.last else 0.0,
            interval_s=self.interval_s, sample_count=self.count,
            gpu_unavailable_reason=self.gpu_unavailable_reason,
            gpus=tuple(self.gpus[i].summary() for i in sorted(self.gpus)), system=system,
            stop_reason=stop_reason, files=dict(files or {}))


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def read_samples(path: str | Path) -> list[Sample]:
    """Samples from a JSONL log; an incomplete last line (the process was killed mid-write) is ignored."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            if line.strip():
                out.append(Sample.from_dict(json.loads(line)))
    return out


def summarize_samples(samples: Iterable[Sample], interval_s: float = 0.0,
                      gpu_unavailable_reason: str | None = None) -> MonitorSummary:
    """Summary of a finished or killed run, e.g. ``summarize_samples(read_samples(".../samples.jsonl"))``."""
    b = SummaryBuilder(interval_s, gpu_unavailable_reason)
    for s in samples:
        b.add(s)
    return b.build(stop_reason="recovered")


# --- timeline -------------------------------------------------------------------------------------------
def timeline_png(samples: list[Sample], path: str | Path, gpu_unavailable_reason: str | None = None) -> Path:
    """Plot GPU memory (and utilisation) per device and system memory over time into a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    indices = sorted({g.index for s in samples for g in s.gpus})
    panels = 3 if indices else 2
    fig = Figure(figsize=(9, 2.6 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True)
    ax_mem = axes[0]
    if indices:
        for i in indices:
            pts = [(s.elapsed_s, g) for s in samples for g in s.gpus if g.index == i]
            line, = ax_mem.plot([t for t, _ in pts], [g.memory_used_bytes / GIB for _, g in pts],
                                label=f"GPU{i} {pts[-1][1].name} used")
            ax_mem.axhline(pts[-1][1].memory_total_bytes / GIB, color=line.get_color(), linestyle="--",
                           linewidth=0.8, label=f"GPU{i} total")
            util = [(t, g.utilization_percent) for t, g in pts if g.utilization_percent is not None]
            if util:
                axes[1].plot([t for t, _ in util], [u for _, u in util], label=f"GPU{i} utilisation")
        ax_mem.set_ylabel("GPU memory (GiB)")
        ax_mem.legend(loc="upper left", fontsize=8)
        axes[1].set_ylabel("utilisation (%)")
        axes[1].set_ylim(0, 100)
        axes[1].legend(loc="upper left", fontsize=8)
    else:
        reason = gpu_unavailable_reason or "no GPU samples"
        ax_mem.text(0.5, 0.5, "GPU figures unavailable:\n" + _wrap(reason, 90), ha="center", va="center",
                    transform=ax_mem.transAxes, fontsize=9)
        ax_mem.set_yticks([])
        ax_mem.set_ylabel("GPU memory")
    ax_sys = axes[-1]
    sys_pts = [s for s in samples if s.system is not None]
    if sys_pts:
        ts = [s.elapsed_s for s in sys_pts]
        ax_sys.plot(ts, [s.system.used_bytes / GIB for s in sys_pts], label="system used")
        rss = [(s.elapsed_s, s.system.process_rss_bytes) for s in sys_pts if s.system.process_rss_bytes is not None]
        if rss:
            ax_sys.plot([t for t, _ in rss], [b / GIB for _, b in rss], label="process RSS")
        ax_sys.axhline(sys_pts[-1].system.total_bytes / GIB, color="grey", linestyle="--", linewidth=0.8,
                       label="system total")
        ax_sys.legend(loc="upper left", fontsize=8)
    ax_sys.set_ylabel("system memory (GiB)")
    ax_sys.set_xlabel("elapsed (s)")
    when = _iso(samples[0].time) if samples else "no samples"
    fig.suptitle(f"kolora-probe monitor — {len(samples)} samples from {when}", fontsize=10)
    path = Path(path)
    fig.savefig(path, format="png", dpi=90)
    return path


def _wrap(text: str, width: int) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join(lines + [cur])


# --- live view ------------------------------------------------------------------------------------------
def _gib(b: float | None) -> str:
    return "?" if b is None else f"{b / GIB:.2f}"


def format_sample(s: Sample) -> str:
    """One line with the current numbers, e.g. ``GPU0 10.20/80.00 GiB 45% 62°C 250W | RAM 12.3/31.2 GiB ...``."""
    parts = []
    for g in s.gpus:
        extra = "".join([f" {g.utilization_percent:.0f}%" if g.utilization_percent is not None else "",
                         f" {g.temperature_c:.0f}°C" if g.temperature_c is not None else "",
                         f" {g.power_w:.0f}W" if g.power_w is not None else ""])
        parts.append(f"GPU{g.index} {_gib(g.memory_used_bytes)}/{_gib(g.memory_total_bytes)} GiB{extra}")
    if s.gpu_error:
        parts.append(f"GPU read failed: {s.gpu_error}")
    if s.system is not None:
        m = s.system
        parts.append(f"RAM {_gib(m.used_bytes)}/{_gib(m.total_bytes)} GiB (avail {_gib(m.available_bytes)})"
                     + (f" RSS {_gib(m.process_rss_bytes)} GiB" if m.process_rss_bytes is not None else ""))
    clock = datetime.fromtimestamp(s.time).strftime("%H:%M:%S")
    return f"{clock} +{s.elapsed_s:7.1f}s  " + " | ".join(parts)


class LiveView:
    """Prints the current numbers: one updating line on a terminal, one line per sample otherwise."""

    def __init__(self, stream: IO[str], tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._open_line = False
        self.closed = False       # the reader went away (``| head -2``): nothing more is shown

    def _write(self, text: str) -> None:
        if self.closed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ValueError, OSError):   # closed pipe / closed file
            self.closed = True
            try:   # later writes and the interpreter's final flush must not raise either
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            except (OSError, ValueError, AttributeError):
                pass

    def note(self, text: str) -> None:
        self._end_line()
        self._write(text + "\n")

    def show(self, s: Sample) -> None:
        line = format_sample(s)
        if self.tty:
            self._write("\r\x1b[K" + line)
            self._open_line = True
        else:
            self._write(line + "\n")

    def _end_line(self) -> None:
        if self._open_line:
            self._write("\n")
            self._open_line = False

    def close(self) -> None:
        self._end_line()


# --- monitor --------------------------------------------------------------------------------------------
class Monitor:
    """Samples GPU and system memory every ``interval_s`` seconds, logs and summarises.

    ``output_dir`` (optional) receives ``samples.jsonl`` (one JSON object per line, flushed and fsync-ed per
    sample), then ``summary.json`` and ``timeline.png`` on :meth:`finish`. Use :meth:`run` in the foreground
    (stops at ``duration_s``, Ctrl-C or :meth:`request_stop`) or :meth:`start`/:meth:`stop` in a background thread.
    """

    def __init__(self, output_dir: str | Path | None = None, interval_s: float = 1.0, *,
                 gpu_source: GpuSource | None = None, system_source: SystemSource | None = None,
                 live: LiveView | None = None, max_history: int = 20_000,
                 clock: Callable[[], float] = time.time) -> None:
        if not interval_s > 0 or math.isinf(interval_s):
            raise ValueError(f"interval must be a positive number of seconds, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.gpu_source: GpuSource = gpu_source if gpu_source is not None else NvmlSource()
        self.system_source = system_source
        self.live = live
        self.max_history = max(2, max_history)
        self.clock = clock
        self.history: list[Sample] = []
        self.gpu_unavailable_reason: str | None = None
        self.stop_reason = "stopped"
        self._stride = 1          # keep every n-th sample in history once max_history is reached
        self._seen = 0
        self._builder: SummaryBuilder | None = None
        self._fd: int | None = None
        self._t0: float | None = None
        self._gpu_ok = False
        self._reported_errors: set[str] = set()
        self._stop = threading.Event()
        self._wake_r: int | None = None   # self-pipe a signal handler writes to (see stop_on_signal)
        self._wake_w: int | None = None
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._summary: MonitorSummary | None = None
        self.started = False

    # paths
    @property
    def samples_path(self) -> Path | None:
        return self.output_dir / SAMPLES_FILE if self.output_dir else None

    @property
    def summary_path(self) -> Path | None:
        return self.output_dir / SUMMARY_FILE if self.output_dir else None

    @property
    def timeline_path(self) -> Path | None:
        return self.output_dir / TIMELINE_FILE if self.output_dir else None

    # lifecycle
    def open(self) -> None:
        """Open the sources and the log. Idempotent. GPU problems become :attr:`gpu_unavailable_reason`."""
        if self.started:
            return
        self.started = True
        if self.system_source is None:
            self.system_source = PsutilSource()
        try:
            self.gpu_unavailable_reason = self.gpu_source.open()
        except Exception as exc:  # noqa: BLE001 - a broken source must not stop system-memory monitoring
            self.gpu_unavailable_reason = nvml_error_reason(exc)
        self._gpu_ok = self.gpu_unavailable_reason is None
        self._builder = SummaryBuilder(self.interval_s, self.gpu_unavailable_reason)
        if self.gpu_unavailable_reason and self.live:
            self.live.note(f"GPU figures unavailable: {self.gpu_unavailable_reason}; "
                           "monitoring system memory only")
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.samples_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)

    def sample_once(self) -> Sample:
        """Take one sample now: record it in the history and summary, append it to the log, show it."""
        self.open()
        now = self.clock()
        if self._t0 is None:
            self._t0 = now
        gpus: tuple[GpuSample, ...] = ()
        error = None
        if self._gpu_ok:
            try:
                gpus = tuple(self.gpu_source.sample())
            except Exception as exc:  # noqa: BLE001 - e.g. GPU fell off the bus: record why, keep going
                error = nvml_error_reason(exc)
        system = self.system_source.sample() if self.system_source is not None else None
        s = Sample(now, now - self._t0, gpus, system, error)
        self._record(s)
        if error and self.live and error not in self._reported_errors:
            self._reported_errors.add(error)
            self.live.note(f"GPU read failed: {error}")
        if self.live:
            self.live.show(s)
            if getattr(self.live, "closed", False):
                self.stop_reason = "stdout closed"
                self._stop.set()
        return s

    def _record(self, s: Sample) -> None:
        assert self._builder is not None
        self._builder.add(s)
        self._seen += 1
        if (self._seen - 1) % self._stride == 0:
            self.history.append(s)
            if len(self.history) > self.max_history:  # thin out: keep every other sample from now on
                self.history = self.history[::2]
                self._stride *= 2
        if self._fd is not None:
            data = (json.dumps(s.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
                    + "\n").encode("utf-8")
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)

    def run(self, duration_s: float | None = None) -> MonitorSummary:
        """Sample until ``duration_s`` elapsed, :meth:`request_stop` or Ctrl-C; then :meth:`finish`."""
        self.open()
        try:
            self._sample_until_stopped(duration_s)
        except KeyboardInterrupt:
            self.stop_reason = "interrupted (Ctrl-C)"
        return self._finish_shielded()

    def _sample_until_stopped(self, duration_s: float | None = None,
                              after_sample: Callable[[], None] | None = None) -> None:
        """Sample at ``start + k·interval`` until ``duration_s`` elapsed (stop reason "duration") or a stop request."""
        start = time.monotonic()
        k = 0
        while True:
            self.sample_once()
            if after_sample is not None:
                after_sample()
            k += 1
            next_at = start + k * self.interval_s
            # wall time, not a count of intervals (an interval of 1e-300 s must not run forever)
            if duration_s is not None and (next_at - start > duration_s + 1e-6
                                           or time.monotonic() - start >= duration_s):
                self.stop_reason = "duration"
                return
            if self._wait(max(0.0, next_at - time.monotonic())):
                return

    def _wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a stop request; True when one came. With :meth:`stop_on_signal` active the
        wait is a ``select`` on the self-pipe the handler writes to (a handler never touches a lock)."""
        if self._stop.is_set():
            return True
        if self._wake_r is None or threading.current_thread() is not threading.main_thread():
            return self._stop.wait(timeout)
        import select

        readable, _, _ = select.select([self._wake_r], [], [], timeout)
        if readable:
            try:
                os.read(self._wake_r, 512)
            except BlockingIOError:
                pass
        return self._stop.is_set() or bool(readable)

    def stop_on_signal(self, signum: int, reason: str) -> Callable[[], None]:
        """Make ``signum`` stop :meth:`run` (main thread only); returns a function restoring the old handler.

        The handler only stores the reason and writes one byte to a self-pipe: calling ``Event.set()`` from a
        handler can deadlock when the signal lands while the main thread holds the event's lock."""
        if self._wake_r is None:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
        wake_w = self._wake_w

        def handler(_signum, _frame) -> None:
            self.stop_reason = reason
            try:
                os.write(wake_w, b"\0")
            except OSError:
                pass

        previous = signal.signal(signum, handler)
        return lambda: signal.signal(signum, previous)

    def _finish_shielded(self) -> MonitorSummary:
        """:meth:`finish` with a second Ctrl-C ignored while the summary and timeline are written."""
        if threading.current_thread() is not threading.main_thread():
            return self.finish()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return self.finish()
        finally:
            signal.signal(signal.SIGINT, previous)

    def request_stop(self, reason: str = "stopped") -> None:
        self.stop_reason = reason
        self._stop.set()

    def start(self) -> "Monitor":
        """Run :meth:`run` in a daemon thread; the first sample is taken before this returns."""
        if self._thread is not None:
            raise RuntimeError("monitor already started")
        self.open()
        first = threading.Event()

        def loop() -> None:
            try:
                self._sample_until_stopped(after_sample=first.set)
            except BaseException as exc:  # noqa: BLE001 - reported by stop()
                self._thread_error = exc
            finally:
                first.set()

        self._thread = threading.Thread(target=loop, name="kolora-probe-monitor", daemon=True)
        self._thread.start()
        first.wait(timeout=30)
        return self

    def stop(self, reason: str = "stopped") -> MonitorSummary:
        """Stop the background thread (one last sample is taken), write summary and timeline."""
        self.request_stop(reason)
        if self._thread is not None:
            self._thread.join()
        if self._thread_error is not None:
            raise RuntimeError(f"monitor thread failed: {self._thread_error!r}") from self._thread_error
        if self._summary is None:
            self.sample_once()  # the state at the moment of stopping
        return self.finish()

    def summary(self) -> MonitorSummary:
        """The summary so far (peaks/means over every sample, including thinned-out ones)."""
        self.open()
        assert self._builder is not None
        files = {}
        if self.output_dir is not None:
            files = {"samples": str(self.samples_path), "summary": str(self.summary_path),
                     "timeline": str(self.timeline_path)}
        return self._builder.build(self.stop_reason, files)

    def finish(self) -> MonitorSummary:
        """Close the log and sources; write ``summary.json`` and ``timeline.png``. Idempotent."""
        if self._summary is not None:
            return self._summary
        self.open()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None
        try:
            self.gpu_source.close()
        except Exception:  # noqa: BLE001
            pass
        summary = self.summary()
        if self.output_dir is not None:
            tmp = self.summary_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
            tmp.replace(self.summary_path)
            timeline_png(self.history, self.timeline_path, self.gpu_unavailable_reason)
        if self.live:
            self.live.close()
        self._summary = summary
        return summary


# --- command line ---------------------------------------------------------------------------------------
HELP = "watch GPU (NVML) and system memory; log samples to JSONL, write a summary JSON and a timeline PNG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=float, default=30.0, metavar="SECONDS",
                        help="seconds between samples (default: 30)")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds (default: until Ctrl-C or SIGTERM)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="directory for samples.jsonl, summary.json and timeline.png "
                             "(default: reports/monitor-YYYYmmdd-HHMMSS)")
    parser.add_argument("--pid", type=int, default=None,
                        help="process whose RSS is recorded (default: the monitor itself)")


def _default_output() -> Path:
    return Path("reports") / datetime.now().strftime("monitor-%Y%m%d-%H%M%S")


def describe_summary(summary: MonitorSummary) -> list[str]:
    """Short human-readable lines for the end of a run."""
    lines = [f"{summary.sample_count} samples over {summary.duration_s:.1f} s (stopped: {summary.stop_reason})"]
    for g in summary.gpus:
        u = g.utilization_percent
        lines.append(f"GPU{g.index} {g.name}: peak {_gib(g.memory_used_bytes.peak)} / "
                     f"{_gib(g.memory_total_bytes)} GiB, mean {_gib(g.memory_used_bytes.mean)} GiB"
                     + (f", peak utilisation {u.peak:.0f}%" if u.peak is not None else ""))
    if summary.gpu_unavailable_reason:
        lines.append("GPU: no figures (see the note above)")
    if summary.system is not None:
        m = summary.system
        lines.append(f"system memory: peak used {_gib(m.used_bytes.peak)} / {_gib(m.total_bytes)} GiB, "
                     f"lowest available {_gib(m.available_bytes.low)} GiB, "
                     f"peak RSS {_gib(m.process_rss_bytes.peak)} GiB")
    for name, path in summary.files.items():
        lines.append(f"{name}: {path}")
    return lines


MIN_INTERVAL_S = 0.01        # NVML's own counters update no faster; a smaller interval only burns a core
MAX_INTERVAL_S = 86_400.0


def run(args: argparse.Namespace) -> int:
    if not (args.interval > 0) or math.isinf(args.interval):
        print(f"kolora-probe monitor: --interval must be > 0 seconds, got {args.interval}", file=sys.stderr)
        return 2
    if not MIN_INTERVAL_S <= args.interval <= MAX_INTERVAL_S:
        print(f"kolora-probe monitor: --interval {args.interval:g} is out of range; fix: give --interval between "
              f"{MIN_INTERVAL_S:g} and {MAX_INTERVAL_S:g} seconds", file=sys.stderr)
        return 2
    if args.duration is not None and not (args.duration >= 0 and math.isfinite(args.duration)):
        print(f"kolora-probe monitor: --duration must be >= 0 seconds, got {args.duration}", file=sys.stderr)
        return 2
    try:
        system = PsutilSource(args.pid)
    except Exception as exc:  # noqa: BLE001 - psutil.NoSuchProcess: one line, no traceback
        print(f"kolora-probe monitor: cannot watch process {args.pid}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output) if args.output else _default_output()
    live = LiveView(sys.stdout)
    monitor = Monitor(out, args.interval, system_source=system, live=live)
    try:
        monitor.open()
    except OSError as exc:   # --output is a file, unwritable, too long a name, ...
        print(f"kolora-probe monitor: --output {str(out)[:200]} is not a writable directory "
              f"({type(exc).__name__}: {exc.strerror or exc}); fix: pass --output a directory you can write to",
              file=sys.stderr)
        return 2
    restore = None
    if threading.current_thread() is threading.main_thread():
        restore = monitor.stop_on_signal(signal.SIGTERM, "SIGTERM")
    try:
        summary = monitor.run(args.duration)
    finally:
        if restore is not None:
            restore()
    for line in describe_summary(summary):
        live.note(line)      # a closed stdout (``| head -2``) is not an error: the files are written
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kolora_probe.monitor.recorder", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
