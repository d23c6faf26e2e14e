"""Launch pre-flight for a multi-process job (``torchrun`` / ``accelerate launch``): does the launch itself work?

:func:`run_preflight` does every collective once, in the same order on every rank, and never raises: each step's
failure is recorded as one line, so a check that fails on one rank cannot leave the others waiting in a
collective. Steps:

1. the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
   ``MASTER_PORT``, set by torchrun and accelerate alike) is present and consistent;
2. the rendezvous (``init_process_group``, NCCL on GPUs, gloo on the CPU) completes within
   ``[distributed].rendezvous_timeout_s``, else it fails with the reason (which ranks never joined) instead of
   hanging; the same timeout bounds every later collective;
3. each rank's facts (host, local rank, device, library versions, a digest of the effective plan) are gathered
   with ``all_gather_object`` so the odd rank can be named;
4. an all-reduce (sum) of ``rank + 1`` everywhere, whose result must be ``N(N+1)/2`` exactly;
5. all-reduce bus bandwidth: ``algbw = bytes / time``, ``busbw = algbw · 2(N-1)/N`` (the nccl-tests
   definition), median of timed iterations after a warm-up; on GPUs compared with the link NVML reports
   (NVLink: active links × per-link rate; else PCIe generation × width).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Mapping

LAUNCH_HINT = ("run them under a launcher: `torchrun --standalone --nproc-per-node N -m pytest -m distributed "
               "--model=DIR` (or `accelerate launch -m pytest -m distributed --model=DIR`)")
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
VERSION_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "kolora-probe")
# per-direction bytes/s of one NVLink link by NVML's nvmlDeviceGetNvLinkVersion (NVLink 1…5)
NVLINK_GBPS_PER_LINK = {1: 20e9, 2: 25e9, 3: 25e9, 4: 25e9, 5: 50e9}
# usable bytes/s per PCIe lane by generation (after line encoding)
PCIE_BYTES_PER_LANE = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The launcher's variables, or None outside a launcher (no ``RANK``/``WORLD_SIZE``)."""
    env = os.environ if environ is None else environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    problems: list[str] = []
    vals: dict[str, int] = {}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        raw = env.get(k)
        try:
            vals[k] = int(raw) if raw is not None else -1
        except ValueError:
            vals[k] = -1
            problems.append(f"{k}={raw!r} is not an integer")
        if raw is None:
            problems.append(f"{k} is not set (torchrun and accelerate launch set it)")
    rank, ws, lr, lws = vals["RANK"], vals["WORLD_SIZE"], vals["LOCAL_RANK"], vals["LOCAL_WORLD_SIZE"]
    if ws >= 1 and not 0 <= rank < ws:
        problems.append(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={ws})")
    if lws >= 1 and not 0 <= lr < lws:
        problems.append(f"LOCAL_RANK={lr} is outside 0..LOCAL_WORLD_SIZE-1 (LOCAL_WORLD_SIZE={lws})")
    if ws >= 1 and lws > ws:
        problems.append(f"LOCAL_WORLD_SIZE={lws} exceeds WORLD_SIZE={ws}")
    if not env.get("MASTER_ADDR"):
        problems.append("MASTER_ADDR is not set")
    return LaunchEnv(rank, ws, lr, lws, env.get("MASTER_ADDR", ""), vals["MASTER_PORT"], tuple(problems))


@dataclass(frozen=True)
class RankFacts:
    rank: int
    local_rank: int
    world_size: int
    host: str
    device: str                  # "cuda:1 (NVIDIA H100 …, uuid …)" or "cpu"
    device_uuid: str | None
    versions: Mapping[str, str]
    plan_digest: str
    pid: int


def plan_digest(plan_dict: Mapping[str, Any]) -> str:
    """A short digest of the effective plan (its source path excluded: ranks may name it differently)."""
    d = {k: v for k, v in plan_dict.items() if k != "source"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:
        import torch

        out["cuda"] = str(torch.version.cuda)
        if torch.cuda.is_available():
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001 - a broken torch is reported by the environment checks
        pass
    return out


def local_facts(env: LaunchEnv, device: str, plan_dict: Mapping[str, Any]) -> RankFacts:
    uuid = None
    desc = device
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(torch.device(device))
        uuid = str(getattr(props, "uuid", "")) or None
        desc = f"{device} ({props.name}, uuid {uuid})"
    return RankFacts(env.rank, env.local_rank, env.world_size, socket.gethostname(), desc, uuid,
                     library_versions(), plan_digest(plan_dict), os.getpid())


def odd_ranks(values: Mapping[int, Any]) -> tuple[Any, dict[int, Any]]:
    """(the value most ranks have — rank 0's on a tie, {rank: value} of the ranks that differ)."""
    counts: dict[str, list[int]] = {}
    for r, v in sorted(values.items()):
        counts.setdefault(json.dumps(v, sort_keys=True, default=str), []).append(r)
    best = max(counts.values(), key=lambda rs: (len(rs), -min(rs)))
    majority = values[best[0]]
    return majority, {r: v for r, v in sorted(values.items()) if r not in best}


def version_mismatches(facts: list[RankFacts]) -> list[str]:
    """One line per library whose version differs between ranks, naming the odd rank(s)."""
    lines = []
    names = sorted({k for f in facts for k in f.versions})
    for name in names:
        majority, odd = odd_ranks({f.rank: f.versions.get(name, "missing") for f in facts})
        for r, v in odd.items():
            host = next(f.host for f in facts if f.rank == r)
            lines.append(f"rank {r} ({host}) has {name} {v}, the other ranks {majority}")
    return lines


def device_problems(facts: list[RankFacts]) -> list[str]:
    """On GPUs: every local rank of a host on its own device."""
    problems = []
    by_dev: dict[tuple[str, str], list[int]] = {}
    for f in facts:
        if f.device_uuid:
            by_dev.setdefault((f.host, f.device_uuid), []).append(f.rank)
    for (host, uuid), ranks in by_dev.items():
        if len(ranks) > 1:
            problems.append(f"ranks {ranks} on {host} share one GPU ({uuid}); give each local rank its own "
                            f"device (torch.cuda.set_device(LOCAL_RANK), CUDA_VISIBLE_DEVICES)")
    ranks = sorted(f.rank for f in facts)
    if ranks != list(range(len(facts))):
        problems.append(f"ranks reported {ranks}, expected 0..{len(facts) - 1} once each")
    pairs = [(f.host, f.local_rank) for f in facts]
    if len(set(pairs)) != len(pairs):
        problems.append("two ranks on one host report the same LOCAL_RANK")
    return problems


@dataclass(frozen=True)
class Bandwidth:
    nbytes: int
    seconds: float               # median of the timed iterations
    algbw: float                 # bytes/s
    busbw: float                 # bytes/s, nccl-tests' bus bandwidth
    link: str | None = None      # e.g. "NVLink 4 × 18 links" / "PCIe gen 4 x16"; None on the CPU
    link_bytes_per_s: float | None = None


@dataclass
class PreflightResult:
    env: LaunchEnv | None
    backend: str | None = None
    device: str | None = None
    rendezvous_s: float | None = None
    errors: dict[str, str] = field(default_factory=dict)     # step → one line
    facts: list[RankFacts] = field(default_factory=list)
    all_reduce: dict[str, Any] = field(default_factory=dict)
    bandwidth: Bandwidth | None = None
    per_rank_busbw: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d


def link_bandwidth(local_rank: int) -> tuple[str, float] | None:
    """(description, bytes/s one way) of the GPU's fastest link from NVML, or None without NVML."""
    from kolora_probe.env.nvml import nvml_init, nvml_shutdown

    pynvml, why = nvml_init()
    if pynvml is None:
        return None
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(local_rank)
        active, version = 0, 0
        for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if pynvml.nvmlDeviceGetNvLinkState(h, link):
                    active += 1
                    version = version or pynvml.nvmlDeviceGetNvLinkVersion(h, link)
            except Exception:  # noqa: BLE001 - no such link / not supported
                break
        if active:
            rate = NVLINK_GBPS_PER_LINK.get(version, 25e9)
            return f"NVLink {version} × {active} links", active * rate
        gen = pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h)
        width = pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)
        return f"PCIe gen {gen} x{width}", PCIE_BYTES_PER_LANE.get(gen, 0.985e9) * width
    except Exception:  # noqa: BLE001 - reported as "link unknown"
        return None
    finally:
        nvml_shutdown(pynvml)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure_all_reduce(device: str, world_size: int, nbytes: int, iters: int = 5) -> Bandwidth:
    import torch
    import torch.distributed as dist

    t = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dist.all_reduce(t)     # warm-up (NCCL communicator set-up)
    _sync(device)
    times = []
    for _ in range(iters):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        dist.all_reduce(t)
        _sync(device)
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    algbw = t.numel() * 4 / s
    return Bandwidth(t.numel() * 4, s, algbw, algbw * 2 * (world_size - 1) / world_size)


def rendezvous_error(exc: BaseException, env: LaunchEnv, timeout_s: float) -> str:
    text = " ".join(str(exc).split())
    return (f"rendezvous at {env.master_addr}:{env.master_port} did not complete within {timeout_s:g} s "
            f"(rank {env.rank} of {env.world_size}): {type(exc).__name__}: {text[:300]}; check that all "
            f"{env.world_size} ranks were started (--nproc-per-node × --nnodes), that MASTER_ADDR/MASTER_PORT are "
            f"reachable from every node, and raise [distributed].rendezvous_timeout_s if nodes start slowly")


def run_preflight(plan_dict: Mapping[str, Any], timeout_s: float = 60.0, environ: Mapping[str, str] | None = None,
                  bandwidth_bytes: int | None = None) -> PreflightResult:
    """Every step above once, errors recorded (never raised). Leaves the process group initialised (the caller
    destroys it with :func:`shutdown`)."""
    env = launch_env(environ)
    res = PreflightResult(env)
    if env is None:
        res.errors["launch"] = "not started by a launcher (no RANK / WORLD_SIZE in the environment); " + LAUNCH_HINT
        return res
    if not env.ok:
        res.errors["launch"] = "launcher environment inconsistent: " + "; ".join(env.problems)
        return res
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    res.backend = "nccl" if cuda else "gloo"
    res.device = f"cuda:{env.local_rank}" if cuda else "cpu"
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            res.errors["launch"] = (f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} GPU(s) visible "
                                    f"on this node: start at most that many processes per node")
            return res
        torch.cuda.set_device(env.local_rank)
    t0 = time.perf_counter()
    try:
        kw: dict[str, Any] = {"device_id": torch.device(res.device)} if cuda else {}
        dist.init_process_group(res.backend, timeout=timedelta(seconds=timeout_s), **kw)
        dist.barrier()   # NCCL connects lazily: make the rendezvous real
    except Exception as exc:  # noqa: BLE001 - DistStoreError (timeout), RuntimeError, ...
        res.errors["rendezvous"] = rendezvous_error(exc, env, timeout_s)
        return res
    res.rendezvous_s = time.perf_counter() - t0
    try:
        mine = local_facts(env, res.device, plan_dict)
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, mine)
        res.facts = sorted(gathered, key=lambda f: f.rank)
    except Exception as exc:  # noqa: BLE001
        res.errors["gather"] = f"gathering every rank's facts failed: {type(exc).__name__}: {exc}"[:400]
        return res
    try:
        t = torch.full((1024,), float(env.rank + 1), dtype=torch.float64, device=res.device)
        dist.all_reduce(t)
        expected = env.world_size * (env.world_size + 1) / 2
        got = t.cpu()
        res.all_reduce = {"expected": expected, "min": float(got.min()), "max": float(got.max()),
                          "ok": bool((got == expected).all())}
    except Exception as exc:  # noqa: BLE001
        res.errors["all_reduce"] = f"all-reduce failed: {type(exc).__name__}: {exc}"[:400]
        return res
    try:
        nbytes = bandwidth_bytes or ((256 if cuda else 16) * 2 ** 20)
        bw = measure_all_reduce(res.device, env.world_size, nbytes)
        link = link_bandwidth(env.local_rank) if cuda else None
        if link:
            bw = Bandwidth(bw.nbytes, bw.seconds, bw.algbw, bw.busbw, link[0], link[1])
        res.bandwidth = bw
        all_bw: list[Any] = [None] * env.world_size
        dist.all_gather_object(all_bw, (env.rank, bw.busbw))
        res.per_rank_busbw = dict(all_bw)
    except Exception as exc:  # noqa: BLE001
        res.errors["bandwidth"] = f"all-reduce bandwidth measurement failed: {type(exc).__name__}: {exc}"[:400]
    return res


def shutdown() -> None:
    """A last barrier (every rank waits for the others, e.g. for rank 0 writing reports), then leave."""
    import sys

    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a rank already gone: leave anyway
            pass
        dist.destroy_process_group()
