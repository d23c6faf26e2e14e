"""The plan's ``[distributed]`` table completed from the launcher's own config file.

``[distributed].config`` (or ``--distributed-config``) names an accelerate config YAML (``accelerate config``'s
output: ``distributed_type``, ``num_processes``, ``num_machines``, ``fsdp_config``, ``deepspeed_config``) or a
DeepSpeed JSON (``zero_optimization.stage``, ``offload_optimizer.device``, ``offload_param.device``). Its values
fill the keys the plan leaves at their defaults; keys the plan or the command line set win. A bad file raises
:class:`kolora_probe.plan.schema.PlanError` with one line naming the file, the key and the fix.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from kolora_probe.plan.schema import DistributedSpec, Plan, PlanError

_ACCELERATE_TYPES = {"NO": "none", "MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "FSDP": "fsdp"}


def _offloaded(device: Any) -> bool:
    return isinstance(device, str) and device.lower() in ("cpu", "nvme")


def _from_deepspeed(doc: Mapping[str, Any], where: str) -> dict[str, Any]:
    zero = doc.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise PlanError([f"{where}: zero_optimization must be an object; see DeepSpeed's config JSON reference"])
    stage = zero.get("stage", 0)
    if stage not in (2, 3):
        raise PlanError([f"{where}: zero_optimization.stage = {stage!r} is not modelled; kolora-probe predicts "
                         f"ZeRO stage 2 or 3 (set \"stage\": 2 or 3)"])
    out: dict[str, Any] = {"strategy": f"zero{stage}"}
    out["offload_optimizer"] = _offloaded((zero.get("offload_optimizer") or {}).get("device"))
    if stage == 3:
        out["offload_params"] = _offloaded((zero.get("offload_param") or {}).get("device"))
    return out


def _from_accelerate(doc: Mapping[str, Any], where: str, base: Path) -> dict[str, Any]:
    kind = str(doc.get("distributed_type", "NO")).upper()
    out: dict[str, Any] = {}
    if isinstance(doc.get("num_processes"), int) and doc["num_processes"] >= 1:
        out["world_size"] = doc["num_processes"]
    if isinstance(doc.get("num_machines"), int) and doc["num_machines"] >= 1:
        out["nodes"] = doc["num_machines"]
    if kind == "DEEPSPEED":
        ds = doc.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            out.update(read_launch_config(base / str(ds["deepspeed_config_file"])))
            return out
        stage = ds.get("zero_stage")
        if stage not in (2, 3):
            raise PlanError([f"{where}: deepspeed_config.zero_stage = {stage!r} is not modelled; set 2 or 3"])
        out["strategy"] = f"zero{stage}"
        out["offload_optimizer"] = _offloaded(ds.get("offload_optimizer_device"))
        if stage == 3:
            out["offload_params"] = _offloaded(ds.get("offload_param_device"))
        return out
    if kind not in _ACCELERATE_TYPES:
        raise PlanError([f"{where}: distributed_type = {kind!r} is not modelled; expected one of "
                         + ", ".join(list(_ACCELERATE_TYPES) + ["DEEPSPEED"])])
    out["strategy"] = _ACCELERATE_TYPES[kind]
    if kind == "FSDP":
        fsdp = doc.get("fsdp_config") or {}
        reshard = fsdp.get("fsdp_reshard_after_forward", fsdp.get("fsdp_sharding_strategy", True))
        if isinstance(reshard, str):   # FSDP1 sharding strategy names
            reshard = reshard.upper() not in ("SHARD_GRAD_OP", "NO_SHARD", "_HYBRID_SHARD_ZERO2")
        out["reshard_after_forward"] = bool(reshard)
        out["cpu_offload"] = bool(fsdp.get("fsdp_offload_params", False))
    return out


def read_launch_config(path: str | Path) -> dict[str, Any]:
    """``{DistributedSpec field: value}`` read from an accelerate YAML or a DeepSpeed JSON file."""
    p = Path(path)
    where = f"distributed config {p}"
    if not p.is_file():
        raise PlanError([f"{where}: file not found; set [distributed].config (or --distributed-config) to an "
                         f"accelerate config YAML or a DeepSpeed JSON"])
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError([f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}); fix the DeepSpeed "
                             f"config"]) from None
    else:
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PlanError([f"{where}: not valid YAML ({str(exc).splitlines()[0]}); fix the accelerate "
                             f"config"]) from None
    if not isinstance(doc, dict):
        raise PlanError([f"{where}: expected a mapping at the top level; give an accelerate config YAML or a "
                         f"DeepSpeed JSON"])
    if "zero_optimization" in doc:
        return _from_deepspeed(doc, where)
    if "distributed_type" in doc:
        return _from_accelerate(doc, where, p.parent)
    raise PlanError([f"{where}: neither an accelerate config (no distributed_type) nor a DeepSpeed config "
                     f"(no zero_optimization)"])


def resolve_distributed(plan: Plan) -> Plan:
    """``plan`` with ``[distributed]`` completed from its ``config`` file (keys the plan set win)."""
    spec = plan.distributed
    if not spec.config:
        return plan
    path = Path(spec.config)
    if not path.is_absolute() and plan.source and Path(plan.source.split(" + ")[0]).is_file():
        candidate = Path(plan.source.split(" + ")[0]).parent / path
        path = candidate if candidate.is_file() else path
    values = read_launch_config(path)
    defaults = DistributedSpec()
    fill = {k: v for k, v in values.items() if getattr(spec, k) == getattr(defaults, k)}
    new = dataclasses.replace(spec, **fill)
    if new.world_size % new.nodes:
        raise PlanError([f"distributed config {path}: world_size {new.world_size} is not a multiple of nodes "
                         f"{new.nodes}"])
    return dataclasses.replace(plan, distributed=new)
