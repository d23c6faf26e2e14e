"""Per-rank peak memory of one LoRA/QLoRA training step under DDP, FSDP2 and DeepSpeed ZeRO-2/3.

``[training].batch_size`` is the batch of one rank (the micro-batch); every rank runs the same step on it.

* ``none``: one GPU's step, exactly :func:`kolora_probe.memory.budget.estimate` (single-GPU predictions unchanged).
* ``fsdp`` (FSDP2, ``fully_shard``): a traced step. The plan's meta model + PEFT LoRA is turned into fake tensors,
  every decoder layer (the model's ``_no_split_modules`` classes, the unit accelerate's transformer auto-wrap uses)
  and then the root are ``fully_shard``-ed over a device mesh of N ranks backed by PyTorch's fake process group
  (``init_process_group("fake")``: one process plays rank 0 of N, collectives return without communicating), and
  one steady-state step runs under ``torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker``, which tags
  sharded / unsharded parameters, all-gather and reduce-scatter buffers, gradients, activations and optimizer
  state. CUDA kernels are emulated and storages rounded to 512 B as in the single-GPU trace. With CPU offload the
  sharded parameters, gradients and optimizer states are left out of the GPU figure. Where the trace cannot run
  (4-bit weights: bitsandbytes' ``Params4bit`` is not a DTensor-shardable parameter here, or a process group is
  already initialised) :func:`fsdp_closed_form` is used and the estimate says so.
* ``ddp``: one GPU's traced step plus DDP's gradient buckets: the reducer allocates one flat buffer per bucket for
  the trainable parameters' gradients at construction (``gradient_as_bucket_view=False``, PyTorch's default) and
  keeps them, so they are resident at the step's peak. Buckets are assigned by
  ``torch.distributed._compute_bucket_assignment_by_size`` with DDP's limits (1 MiB first bucket, 25 MiB after).
  With CPU semantics (gloo) one more bucket-sized buffer is live during the all-reduce (measured: a real 2-rank
  CPU DDP step exceeds one rank's step + buckets by exactly the bucket); NCCL reduces in place.
* ``zero2`` / ``zero3``: a closed form on top of one GPU's traced step: activations, logits and workspace from the
  trace; the frozen weights replicated (ZeRO-2) or partitioned 1/N (ZeRO-3, plus the largest layer gathered);
  the trainable (LoRA) model states as DeepSpeed 0.19.8 counts them, per trainable parameter P:
  ZeRO-2 ``2·P + 18·P/N`` (16-bit params; 16-bit grads, fp32 grads, fp32 master params and two fp32 Adam
  moments partitioned), ``2·P`` with the optimizer offloaded; ZeRO-3 ``4·largest_layer + 18·P/N``,
  ``4·largest_layer + 2·P/N`` (optimizer offloaded), ``4·largest_layer`` (parameters offloaded too)
  (``deepspeed/runtime/zero/stage_1_and_2.py: estimate_zero2_model_states_mem_needs`` and
  ``deepspeed/runtime/zero/stage3.py: estimate_zero3_model_states_mem_needs``, ``largest_layer`` = the most
  parameters one module owns directly, as ``deepspeed ... model_to_params`` counts). With fp32 compute (no
  mixed precision) the trainable states are ``4·P + 12·P/N``; SGD keeps no moments (``- 8·P/N``).
  :func:`deepspeed_model_states_bytes` with no frozen weights reproduces DeepSpeed's own estimators
  (tests/test_memory_distributed.py cross-checks it when deepspeed is importable).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from kolora_probe.memory.trace import CUDA_BLOCK, MemoryEstimate, StepShape, TraceUnsupported, round_block, rounding

STRATEGIES = ("none", "ddp", "fsdp", "zero2", "zero3")
SHARDED = ("fsdp", "zero3")
MAX_WORLD_SIZE = 1024
DDP_FIRST_BUCKET_BYTES = 1024 * 1024          # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET_BYTES = 25 * 1024 * 1024           # DistributedDataParallel(bucket_cap_mb=25)


@dataclass(frozen=True)
class RankEstimate:
    """Predicted peak of one rank (rank 0) for ``strategy`` on ``world_size`` ranks."""
    strategy: str
    world_size: int
    nodes: int
    per_rank_peak_bytes: int
    components: Mapping[str, int]          # bytes live at the rank's peak; sums to per_rank_peak_bytes
    method: str                            # fsdp2_mem_tracker | trace+ddp_buckets | trace+zero_closed_form | ...
    single_gpu: MemoryEstimate             # the one-GPU step it is built on (or compared with)
    semantics: str = "cuda"
    wall_s: float = 0.0
    offloaded_bytes: int = 0               # per rank, kept in host memory instead (offload options)
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "world_size": self.world_size, "nodes": self.nodes,
                "per_rank_peak_bytes": self.per_rank_peak_bytes, "components": dict(self.components),
                "method": self.method, "semantics": self.semantics, "wall_s": round(self.wall_s, 3),
                "offloaded_bytes": self.offloaded_bytes, "notes": list(self.notes),
                "single_gpu_peak_bytes": self.single_gpu.predicted_peak_bytes}


@dataclass(frozen=True)
class ParamFacts:
    """Parameter counts of the plan's model + LoRA (shared tensors once)."""
    trainable: int
    frozen: int
    largest_layer: int          # most parameters one module owns directly (DeepSpeed's largest_layer_params)
    trainable_numels: tuple[int, ...]
    trainable_element_size: int
    largest_block_bytes: int    # the largest FSDP unit (decoder layer) in the frozen weights' storage


def param_facts(config: Any, shape: StepShape) -> ParamFacts:
    """Counts from the meta-device model of the plan (no weights)."""
    from kolora_probe.memory.trace import build_step_model, step_config

    model = build_step_model(step_config(config, shape), shape, "meta")
    seen: set[int] = set()
    trainable: list[int] = []
    frozen = 0
    elsize = 4
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable.append(p.numel())
            elsize = p.element_size()
        else:
            frozen += p.numel()
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    blocks = _wrap_units(model)
    block_bytes = max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks), default=0)
    return ParamFacts(sum(trainable), frozen, largest, tuple(trainable), elsize, block_bytes)


def _wrap_units(model: Any) -> list[Any]:
    """The modules FSDP wraps one by one: instances of the model's ``_no_split_modules`` classes (decoder layers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


# --- DDP ---------------------------------------------------------------------------------------------------
def ddp_bucket_bytes(trainable_numels: tuple[int, ...], element_size: int, block: int = CUDA_BLOCK) -> list[int]:
    """Bytes of each DDP gradient bucket, as torch assigns them (reverse parameter order, 1 MiB then 25 MiB)."""
    import torch
    import torch.distributed as dist

    if not trainable_numels:
        return []
    dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}.get(element_size, torch.float32)
    tensors = [torch.empty(n, dtype=dtype, device="meta") for n in reversed(trainable_numels)]
    buckets, _ = dist._compute_bucket_assignment_by_size(tensors, [DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_BYTES],
                                                         [False] * len(tensors))
    return [round_block(sum(tensors[i].numel() for i in b) * element_size, block) for b in buckets]


# --- ZeRO --------------------------------------------------------------------------------------------------
def deepspeed_model_states_bytes(strategy: str, trainable: int, world_size: int, largest_layer: int = 0,
                                 mixed_precision: bool = True, offload_optimizer: bool = False,
                                 offload_params: bool = False, adam: bool = True) -> int:
    """GPU bytes of the trainable model states per rank, DeepSpeed 0.19.8's accounting (module docstring)."""
    p, n = trainable, world_size
    moments = 8 if adam else 0
    if strategy == "zero2":
        if offload_optimizer:
            return 2 * p if mixed_precision else 4 * p
        return (2 * p + int((10 + moments) * p / n)) if mixed_precision else (4 * p + int((4 + moments) * p / n))
    if strategy == "zero3":
        gathered = 4 * largest_layer
        if offload_optimizer and offload_params:
            return gathered
        if offload_optimizer:
            return gathered + int((2 if mixed_precision else 4) * p / n)
        return gathered + int(((10 + moments) if mixed_precision else (8 + moments)) * p / n)
    raise ValueError(f"strategy {strategy!r} is not a ZeRO stage; expected zero2 or zero3")


def zero_rank_estimate(single: MemoryEstimate, facts: ParamFacts, strategy: str, world_size: int, nodes: int = 1,
                       offload_optimizer: bool = False, offload_params: bool = False) -> RankEstimate:
    shape, c = single.shape, single.components
    mixed = shape.dtype in ("bf16", "fp16")
    adam = shape.optimizer != "sgd"
    states = deepspeed_model_states_bytes(strategy, facts.trainable, world_size, facts.largest_layer, mixed,
                                          offload_optimizer, offload_params, adam)
    frozen = c.get("frozen_weights", 0)
    comp: dict[str, int] = {}
    offloaded = 0
    if strategy == "zero2":
        comp["frozen_weights"] = frozen
    else:
        comp["frozen_weights_sharded"] = 0 if offload_params else math.ceil(frozen / world_size)
        offloaded += math.ceil(frozen / world_size) if offload_params else 0
    comp["lora_model_states"] = states
    for k in ("activations", "logits_and_loss", "workspace"):
        comp[k] = c.get(k, 0)
    notes = [f"ZeRO model states: DeepSpeed 0.19.8 accounting for {facts.trainable:,} trainable parameters "
             f"({'16-bit mixed precision' if mixed else 'fp32'}); activations, logits and workspace from the "
             f"one-GPU trace"]
    if shape.optimizer == "adamw_8bit":
        notes.append("8-bit AdamW is counted as DeepSpeed's fp32 Adam (DeepSpeed partitions its own optimizer)")
    if offload_optimizer:
        notes.append("optimizer states and fp32 master weights offloaded to the CPU")
        offloaded += deepspeed_model_states_bytes(strategy, facts.trainable, world_size, facts.largest_layer,
                                                  mixed, False, False, adam) - states
    return RankEstimate(strategy, world_size, nodes, sum(comp.values()), comp, "trace+zero_closed_form", single,
                        single.semantics, single.wall_s, offloaded, tuple(notes))


# --- FSDP2 -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def fake_process_group(world_size: int):
    """PyTorch's fake process group of ``world_size`` ranks in this process (this process is rank 0)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise TraceUnsupported("a process group is already initialised in this process; the FSDP trace needs its "
                               "own fake one (run `kolora-probe estimate` outside the launcher)")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def trace_fsdp_step(config: Any, shape: StepShape, world_size: int, *, reshard_after_forward: bool = True,
                    cpu_offload: bool = False, cuda: bool = True, nodes: int = 1,
                    single: MemoryEstimate | None = None) -> RankEstimate:
    """Rank 0's peak of one FSDP2 step of the plan on ``world_size`` ranks, traced with FSDPMemTracker."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from kolora_probe.memory.cuda_emulation import cuda_like_kernels
    from kolora_probe.memory.trace import build_step_model, fakeify, make_optimizer
    from kolora_probe.model.meta import autocast_for

    if shape.quantization != "none":
        raise TraceUnsupported(f"{shape.quantization} frozen weights (bitsandbytes) cannot be fully_shard-ed on "
                               f"fake tensors here")
    t0 = time.perf_counter()
    block = CUDA_BLOCK if cuda else 1
    model = build_step_model(config, shape, "meta")
    units = _wrap_units(model)
    fm = FakeTensorMode()
    fakeify(model, fm, shape.double_quant)
    autocast = autocast_for("cpu", shape.dtype)
    offload = CPUOffloadPolicy(pin_memory=False) if cpu_offload else OffloadPolicy()
    with contextlib.ExitStack() as stack:
        stack.enter_context(fake_process_group(world_size))
        mesh = init_device_mesh("cpu", (world_size,))   # outside the fake mode: the mesh reads real rank tensors
        if cuda:
            stack.enter_context(cuda_like_kernels())
        stack.enter_context(rounding(block))
        stack.enter_context(fm)
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=offload)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=offload)
        trainable = [p for p in model.parameters() if p.requires_grad]
        lora_local = sum(round_block(p.to_local().numel() * p.element_size(), block) for p in trainable)
        opt = make_optimizer(model, shape, cuda=False, traced=True)

        def one_step() -> None:
            ids = torch.zeros((shape.batch_size, shape.seq_len), dtype=torch.long)
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        # warm-up: optimizer state exists afterwards (steady state). A whole step, not trace.reach_steady_state: a
        # no-grad forward leaves FSDP2's parameters unsharded when reshard_after_forward is False.
        one_step()
        fmt = FSDPMemTracker(model, opt)
        with fmt:
            one_step()
        snap = fmt.get_tracker_snapshot("peak")
    by_ref: dict[str, int] = {}
    for dev_snap in snap.values():
        for k, v in dev_snap.items():
            by_ref[getattr(k, "name", str(k))] = by_ref.get(getattr(k, "name", str(k)), 0) + v
    sharded = by_ref.get("SHARDED_PARAM", 0)
    comp = {
        "frozen_weights_sharded": sharded - lora_local + by_ref.get("BUFFER", 0),
        "lora_weights": lora_local,
        "all_gathered_weights": by_ref.get("UNSHARDED_PARAM", 0) + by_ref.get("ALL_GATHER", 0),
        "gradients": (by_ref.get("SHARDED_GRAD", 0) + by_ref.get("UNSHARDED_GRAD", 0)
                      + by_ref.get("REDUCE_SCATTER", 0)),
        "optimizer_states": by_ref.get("OPT", 0),
        "activations": by_ref.get("ACT", 0) + by_ref.get("INP", 0),
        "backward_temporaries": by_ref.get("TEMP", 0),
    }
    notes = [f"FSDP2: {len(units)} {type(units[0]).__name__ if units else 'no'} units + root fully_shard-ed over "
             f"{world_size} fake ranks, traced with FSDPMemTracker "
             f"(reshard_after_forward={reshard_after_forward})"]
    offloaded = 0
    if cpu_offload:
        for k in ("frozen_weights_sharded", "lora_weights", "optimizer_states"):
            offloaded += comp[k]
            comp[k] = 0
        offloaded += by_ref.get("SHARDED_GRAD", 0)
        comp["gradients"] -= by_ref.get("SHARDED_GRAD", 0)
        notes.append("CPU offload: sharded parameters, gradients and optimizer states counted on the host")
    if single is None:
        from kolora_probe.memory.trace import trace_step

        single = trace_step(config, shape, cuda=cuda)
    return RankEstimate("fsdp", world_size, nodes, sum(comp.values()), comp, "fsdp2_mem_tracker", single,
                        "cuda" if cuda else "cpu", time.perf_counter() - t0, offloaded, tuple(notes))


def fsdp_closed_form(single: MemoryEstimate, facts: ParamFacts, world_size: int, nodes: int = 1,
                     reshard_after_forward: bool = True, cpu_offload: bool = False) -> RankEstimate:
    """Fallback when the FSDP2 trace cannot run: weights, gradients and optimizer states 1/N; two decoder
    layers gathered at once (the current one and the prefetched next) when resharding after forward, else all
    frozen weights stay gathered from forward to backward; activations, logits and workspace from one GPU."""
    c = single.components
    n = world_size
    comp = {"frozen_weights_sharded": math.ceil(c.get("frozen_weights", 0) / n),
            "lora_weights": math.ceil(c.get("lora_weights", 0) / n),
            "all_gathered_weights": (2 * facts.largest_block_bytes if reshard_after_forward
                                     else c.get("frozen_weights", 0)) if n > 1 else 0,
            "gradients": math.ceil(c.get("gradients", 0) / n),
            "optimizer_states": math.ceil(c.get("optimizer_states", 0) / n)}
    for k in ("activations", "logits_and_loss", "workspace"):
        comp[k] = c.get(k, 0)
    offloaded = 0
    if cpu_offload:
        for k in ("frozen_weights_sharded", "lora_weights", "gradients", "optimizer_states"):
            offloaded += comp[k]
            comp[k] = 0
    return RankEstimate("fsdp", n, nodes, sum(comp.values()), comp, "fsdp_closed_form", single, single.semantics,
                        single.wall_s, offloaded, ("FSDP closed form (the FSDP2 trace could not run)",))


# --- entry points --------------------------------------------------------------------------------------------
def rank_estimate(config: Any, shape: StepShape, dist: Any, world_size: int | None = None,
                  single: MemoryEstimate | None = None, facts: ParamFacts | None = None,
                  method: str = "trace") -> RankEstimate:
    """Per-rank peak for ``dist`` (a :class:`kolora_probe.plan.schema.DistributedSpec`) at ``world_size`` (default:
    the plan's). ``single``: the one-GPU estimate of ``shape`` if already known."""
    from kolora_probe.memory.budget import estimate

    n = world_size or dist.world_size
    strategy = dist.strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is invalid; expected one of {', '.join(STRATEGIES)}")
    single = single or estimate(config, shape, method)
    if strategy == "none":
        return RankEstimate("none", 1, 1, single.predicted_peak_bytes, dict(single.components), single.method,
                            single, single.semantics, single.wall_s, 0, single.notes)
    if strategy == "fsdp" and method == "trace":
        try:
            return trace_fsdp_step(config, shape, n, reshard_after_forward=dist.reshard_after_forward,
                                   cpu_offload=dist.cpu_offload, nodes=dist.nodes, single=single)
        except Exception as exc:  # noqa: BLE001 - TraceUnsupported or an op the fake FSDP step cannot run
            facts = facts or param_facts(config, shape)
            est = fsdp_closed_form(single, facts, n, dist.nodes, dist.reshard_after_forward, dist.cpu_offload)
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            return replace(est, notes=est.notes + (f"FSDP2 trace not possible ({reason})",))
    facts = facts or param_facts(config, shape)
    if strategy == "fsdp":
        return fsdp_closed_form(single, facts, n, dist.nodes, dist.reshard_after_forward, dist.cpu_offload)
    if strategy == "ddp":
        block = CUDA_BLOCK if single.semantics == "cuda" else 1
        buckets = ddp_bucket_bytes(facts.trainable_numels, facts.trainable_element_size, block)
        comp = dict(single.components)
        comp["ddp_gradient_buckets"] = sum(buckets)
        notes = ()
        if single.semantics == "cpu" and buckets:   # gloo's all-reduce works on a bucket-sized scratch copy
            comp["gloo_allreduce_scratch"] = max(buckets)
            notes = ("CPU semantics: gloo all-reduce scratch (one bucket) measured in a real 2-rank CPU step",)
        return RankEstimate("ddp", n, dist.nodes, sum(comp.values()), comp, f"{single.method}+ddp_buckets", single,
                            single.semantics, single.wall_s, 0,
                            single.notes + (f"DDP: {len(buckets)} gradient bucket(s) resident beside the step",)
                            + notes)
    return zero_rank_estimate(single, facts, strategy, n, dist.nodes, dist.offload_optimizer, dist.offload_params)


def min_world_size(config: Any, shape: StepShape, dist: Any, budget_bytes: int, at: RankEstimate,
                   method: str = "trace", limit: int = MAX_WORLD_SIZE) -> int | None:
    """The smallest world size (a power of two, ≥ nodes) whose per-rank peak fits ``budget_bytes``; None when
    none up to ``limit`` does (activations do not shrink with more ranks). ``at`` is the estimate already made."""
    if dist.strategy == "none":
        return 1 if at.per_rank_peak_bytes <= budget_bytes else None
    known: dict[int, int] = {at.world_size: at.per_rank_peak_bytes}
    facts: list[ParamFacts] = []

    def peak(n: int) -> int:
        if n not in known:
            if dist.strategy == "fsdp" and method == "trace":
                known[n] = rank_estimate(config, shape, dist, n, single=at.single_gpu).per_rank_peak_bytes
            else:
                if not facts:
                    facts.append(param_facts(config, shape))
                known[n] = rank_estimate(config, shape, dist, n, single=at.single_gpu, facts=facts[0],
                                         method=method).per_rank_peak_bytes
        return known[n]

    n = 1
    while n < dist.nodes:
        n *= 2
    if dist.strategy == "fsdp" and method == "trace":
        n = _fsdp_guess(at, budget_bytes, n, limit)   # sharded part ∝ 1/N from the trace made, then confirmed
        if n is None:
            return None
        while n > 1 and peak(n // 2) <= budget_bytes:
            n //= 2
    while n <= limit:
        if peak(n) <= budget_bytes:
            return n
        n *= 2
    return None


def _fsdp_guess(at: RankEstimate, budget: int, start: int, limit: int) -> int | None:
    sharded = sum(v for k, v in at.components.items()
                  if k in ("frozen_weights_sharded", "lora_weights", "gradients", "optimizer_states"))
    fixed = at.per_rank_peak_bytes - sharded
    n = start
    while n <= limit:
        if fixed + sharded * at.world_size / n <= budget:
            return n
        n *= 2
    return None


# --- measurement ---------------------------------------------------------------------------------------------
def measure_ddp_step(config: Any, shape: StepShape, device: str = "cpu") -> Any:
    """One real DDP step of the plan on this rank (the process group is initialised by the caller, e.g. gloo
    under torchrun): the model with LoRA wrapped in ``DistributedDataParallel``, a warm-up step, then one
    measured step. Resident bytes = parameters, buffers, gradients, optimizer state, the batch and the reducer's
    gradient buckets (``reducer._get_zeros_like_grad_buckets()`` gives their real layout); on the CPU the step's
    peak above that comes from the profiler, as for one GPU (:func:`kolora_probe.memory.measure.measure_callable`)."""
    import gc

    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from kolora_probe.memory.measure import measure_callable, resident_bytes, training_step
    from kolora_probe.memory.trace import build_step_model, make_optimizer
    from kolora_probe.model.meta import autocast_for

    cuda = device.startswith("cuda")
    model = build_step_model(config, shape, device)
    ddp = DDP(model, device_ids=[torch.device(device).index or 0] if cuda else None)
    opt = make_optimizer(model, shape, cuda=cuda, traced=False)
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (shape.batch_size, shape.seq_len), device=device)
    step = training_step(ddp, opt, ids, autocast_for(device, shape.dtype))
    step()   # warm-up
    gc.collect()
    buckets = sum(b.buffer().numel() * b.buffer().element_size() for b in ddp.reducer._get_zeros_like_grad_buckets())
    return measure_callable(step, device, baseline=lambda: resident_bytes(model, opt, ids) + buckets)
