"""Does the plan's training step fit its GPU memory budget, and what batch size / sequence length would?

:func:`estimate` predicts the step's peak (trace or closed form); :func:`budget_verdict` compares what the card
needs with ``[budget].gpu_memory_gib``: the predicted allocated peak (what ``max_memory_allocated`` reports) +
the caching allocator's overhead (reserved − allocated: the traced step's allocations and frees replayed through
the allocator's rules, :func:`kolora_probe.memory.trace.replay_caching_allocator`) + the CUDA context.

The largest batch size at the plan's sequence length (and the largest sequence length at the plan's batch size,
up to the model's position limit) that fit come from the closed form (instant, monotonic in both), scaled by
trace / closed form at the plan's shape. Only when the plan does not fit, or the caller asks (``search=True``,
``estimate --max-batch``), are they confirmed with traces (at the answer and one above, searched where they
disagree), so that they are the trace's own boundary: at most :data:`MAX_TRACES_PER_SEARCH` traces per dimension
after the plan's own, which is traced once and reused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from kolora_probe.memory.trace import MemoryEstimate, StepShape, TraceUnsupported

METHODS = ("trace", "closed_form")
MAX_SEARCH_BATCH = 1 << 16
MAX_TRACES_PER_SEARCH = 8
# The CUDA context (driver state + loaded kernel images) is outside PyTorch's allocator. Measured by PyTorch for a
# bare context (https://github.com/pytorch/pytorch/pull/86509): 287,047,680 B with CUDA lazy module loading (the
# default since torch 1.13 with CUDA >= 11.7), 666,632,192 B eager (CUDA_MODULE_LOADING=EAGER or older torch).
# `-m gpu` measures it (NVML used − torch reserved) on the training box.
CUDA_CONTEXT_LAZY_BYTES = 287_047_680
CUDA_CONTEXT_EAGER_BYTES = 666_632_192


def cuda_context_bytes(torch_version: str | None = None, module_loading: str | None = None) -> int:
    """Documented CUDA context size for this torch version and ``CUDA_MODULE_LOADING`` (default: this process)."""
    import os

    from packaging.version import Version

    if torch_version is None:
        import torch

        torch_version = torch.__version__
    loading = (module_loading if module_loading is not None else os.environ.get("CUDA_MODULE_LOADING", "")).upper()
    lazy = Version(Version(torch_version).base_version) >= Version("1.13") and loading != "EAGER"
    return CUDA_CONTEXT_LAZY_BYTES if lazy else CUDA_CONTEXT_EAGER_BYTES


@dataclass(frozen=True)
class BudgetVerdict:
    estimate: MemoryEstimate
    budget_bytes: int
    fits: bool
    max_batch_size: int          # at the plan's seq_len; 0 when not even batch 1 fits
    max_seq_len: int             # at the plan's batch size; 0 when not even length 1 fits
    seq_limit: int | None        # the model's position limit (n_positions / max_position_embeddings)
    search_s: float
    cuda_context_bytes: int = 0
    limits_method: str = "trace"  # trace: both limits are the trace's own boundary; closed_form: scaled estimate
    traces: int = 0               # traces run by the searches (the plan's own trace not counted)

    @property
    def predicted_peak_bytes(self) -> int:
        return self.estimate.predicted_peak_bytes

    @property
    def limits_approximate(self) -> bool:
        """The limits are the closed form scaled to the plan's trace, not confirmed by traces (the plan fits)."""
        return self.estimate.method == "trace" and self.limits_method != "trace"

    @property
    def allocator_overhead_bytes(self) -> int:
        return self.estimate.allocator_overhead_bytes

    @property
    def card_required_bytes(self) -> int:
        """What the card must hold: allocated peak + allocator segment overhead + CUDA context."""
        return self.predicted_peak_bytes + self.allocator_overhead_bytes + self.cuda_context_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.card_required_bytes

    def to_dict(self) -> dict[str, Any]:
        d = self.estimate.to_dict()
        d.update({"budget_bytes": self.budget_bytes, "cuda_context_bytes": self.cuda_context_bytes,
                  "card_required_bytes": self.card_required_bytes, "fits": self.fits,
                  "max_batch_size": self.max_batch_size, "max_seq_len": self.max_seq_len,
                  "limits_method": self.limits_method, "seq_limit": self.seq_limit,
                  "headroom_bytes": self.headroom_bytes, "search_s": round(self.search_s, 3),
                  "search_traces": self.traces})
        return d

    def message(self) -> str:
        """One line: the verdict with numbers, and the fix when it does not fit."""
        gib = 2 ** 30
        s = self.estimate.shape
        head = (f"card needs {self.card_required_bytes / gib:.2f} GiB (predicted peak allocated "
                f"{self.predicted_peak_bytes / gib:.2f} GiB ({self.estimate.method}) + allocator overhead "
                f"{self.allocator_overhead_bytes / gib:.2f} + CUDA context {self.cuda_context_bytes / gib:.2f}) for "
                f"batch {s.batch_size} × seq {s.seq_len} vs budget {self.budget_bytes / gib:.2f} GiB")
        if self.fits:
            approx = "≈" if self.limits_approximate else ""
            return f"{head}: fits (largest batch that fits: {approx}{self.max_batch_size})"
        if self.max_batch_size >= 1:
            fix = (f"largest batch size that fits: {self.max_batch_size} at seq {s.seq_len}; fix: set "
                   f"[training].batch_size = {self.max_batch_size} (or --batch-size {self.max_batch_size})")
        elif self.max_seq_len >= 1:
            fix = (f"largest batch size that fits: 0 at seq {s.seq_len} (not even 1); the longest sequence that "
                   f"fits at batch {s.batch_size} is {self.max_seq_len}; fix: set [training].seq_len = {self.max_seq_len} "
                   f"or raise [budget].gpu_memory_gib")
        else:
            fix = ("largest batch size that fits: 0 (not even batch 1 at seq 1); fix: raise [budget].gpu_memory_gib "
                   "or use 4-bit quantization")
        return f"{head}: does NOT fit; {fix}"


def seq_limit_of(config: Any) -> int | None:
    from kolora_probe.plan.feasibility import position_limit

    limit = position_limit(config)
    return limit.tokens if limit else None


def estimate(config: Any, shape: StepShape, method: str = "trace", facts: Any = None) -> MemoryEstimate:
    """Predicted peak of one step; ``trace`` falls back to the closed form where it cannot run (8-bit)."""
    from kolora_probe.memory.closed_form import closed_form, model_facts

    if method not in METHODS:
        raise ValueError(f"method {method!r} is invalid; expected one of {', '.join(METHODS)}")
    if method == "trace":
        from kolora_probe.memory.trace import trace_step

        try:
            return trace_step(config, shape)
        except Exception as exc:  # noqa: BLE001 - TraceUnsupported, or an op fake tensors cannot run for this model
            est = closed_form(facts or model_facts(config, shape), shape)
            if isinstance(exc, TraceUnsupported):
                note = f"trace not possible ({exc}); closed form used"
            else:
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                note = f"trace failed ({reason}); closed form used, not cross-checked by a trace"
            return replace(est, notes=est.notes + (note,))
    t0 = time.perf_counter()
    est = closed_form(facts or model_facts(config, shape), shape)
    return replace(est, wall_s=time.perf_counter() - t0)


def _largest(fits: Callable[[int], bool], hi_limit: int) -> int:
    """Largest n in [1, hi_limit] with fits(n), assuming monotonic; 0 if none."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= hi_limit and fits(hi):
        lo, hi = hi, hi * 2
    return _bisect(fits, lo, min(hi, hi_limit + 1))


def _bisect(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest n in [lo, hi) with fits(n), given fits(lo) (or lo == 0) and not fits(hi); monotonic fits."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _need(est: MemoryEstimate) -> int:
    """Bytes of the card's budget a step needs besides the CUDA context: allocated peak + allocator overhead."""
    return est.predicted_peak_bytes + est.allocator_overhead_bytes


def _trace_boundary(config: Any, shape: StepShape, budget_bytes: int, est: MemoryEstimate, guess: int,
                    dim: str = "batch_size", limit: int = MAX_SEARCH_BATCH, max_traces: int = MAX_TRACES_PER_SEARCH,
                    counter: list[int] | None = None) -> int:
    """The largest ``dim`` (batch_size or seq_len, up to ``limit``) whose *trace* fits. A trace at the closed
    form's ``guess`` and the plan's own trace give a line (secant) whose crossing of the budget is checked together
    with one more; the boundary is searched with traces only when they disagree with it. Where a trace cannot run
    (or ``max_traces`` are spent) the best bound known so far is kept."""
    from kolora_probe.memory.trace import trace_step

    n0 = getattr(shape, dim)
    peaks: dict[int, int] = {n0: _need(est)}
    known: dict[int, bool] = {n0: _need(est) <= budget_bytes}

    def fits(n: int) -> bool:
        if n not in known:
            if len(known) > max_traces:
                raise RuntimeError("trace budget spent")
            peaks[n] = _need(trace_step(config, shape.with_(**{dim: n})))
            known[n] = peaks[n] <= budget_bytes
            if counter is not None:
                counter[0] += 1
        return known[n]

    try:
        # The peak is close to linear in the batch size (and in the sequence length with O(s) attention): a line
        # through the plan's trace and one at the guess (the closed form's slope is not the trace's when its fixed
        # part is off) lands on or near the boundary.
        n1 = guess if guess >= 1 and guess != n0 else n0 + 1
        if n1 <= limit:
            fits(n1)
            slope = (peaks[n1] - peaks[n0]) / (n1 - n0)
            if slope > 0:
                guess = max(0, min(limit, int((budget_bytes - peaks[n0]) // slope) + n0))
        if guess < 1:
            return 1 if fits(1) else 0
        if fits(guess):
            lo, hi = guess, guess + 1
            step = 1
            while hi <= limit and fits(hi):                 # the guess was low: gallop up
                lo, step = hi, step * 2
                hi = lo + step
            hi = min(hi, limit + 1)
        else:
            lo, hi = 0, guess
            step = 1
            while hi - step >= 1 and not fits(hi - step):   # the guess was high: gallop down
                hi, step = hi - step, step * 2
            lo = max(hi - step, 0)
        return _bisect(fits, lo, hi)
    except Exception:  # noqa: BLE001 - keep the best bound known: the largest size a trace confirmed, else the guess
        confirmed = [n for n, ok in known.items() if ok]
        return max(confirmed) if confirmed else (0 if known.get(guess) is False else guess)


def budget_verdict(config: Any, shape: StepShape, budget_bytes: int, method: str = "trace",
                   est: MemoryEstimate | None = None, search: bool = False,
                   context_bytes: int | None = None) -> BudgetVerdict:
    """Fit yes/no for ``shape`` (allocated + allocator overhead + CUDA context ≤ ``budget_bytes``) and the largest
    batch size / sequence length that fit. ``est``: the plan's estimate when the caller has it (never traced
    twice). The limits are the trace's own boundary when the plan does not fit or ``search`` is set; otherwise
    the closed form scaled to the trace (no further trace)."""
    from kolora_probe.memory.closed_form import closed_form, model_facts

    facts = model_facts(config, shape)
    est = est or estimate(config, shape, method, facts)
    context = cuda_context_bytes() if context_bytes is None else context_bytes
    cap = budget_bytes - context                      # what the allocator may reserve
    t0 = time.perf_counter()

    def cf(b: int, s: int) -> int:
        return closed_form(facts, shape.with_(batch_size=b, seq_len=s)).predicted_peak_bytes

    # Calibrate the closed form to the trace at the plan's shape (it is within ~0.3 % for GPT-2 but can be off
    # by tens of percent for architectures whose attention it does not model, e.g. Gemma 2's soft-capping).
    ratio = 1.0
    if est.method == "trace":
        at_plan = cf(shape.batch_size, shape.seq_len)
        ratio = _need(est) / at_plan if at_plan else 1.0
    max_b = _largest(lambda b: cf(b, shape.seq_len) * ratio <= cap, MAX_SEARCH_BATCH)
    limit = seq_limit_of(config)
    max_s = _largest(lambda s: cf(shape.batch_size, s) * ratio <= cap, limit or 1 << 20)
    fits = _need(est) <= cap
    traced = est.method == "trace" and (search or not fits)
    counter = [0]
    if traced:
        max_b = _trace_boundary(config, shape, cap, est, max_b, counter=counter)
        max_s = _trace_boundary(config, shape, cap, est, max_s, "seq_len", limit or 1 << 20, counter=counter)
    if fits and max_b < shape.batch_size:   # the trace says it fits where the closed form did not
        max_b = shape.batch_size
    if fits and max_s < shape.seq_len:
        max_s = shape.seq_len
    if limit:
        max_s = min(max_s, limit)     # never an answer the model's position embeddings cannot run
    return BudgetVerdict(est, budget_bytes, fits, max_b, max_s, limit, time.perf_counter() - t0, context,
                         "trace" if traced else "closed_form", counter[0])


def check_targets(config: Any, plan: Any, report: Any = None) -> str | None:
    """The one-line problem with the plan's LoRA targets on this model (PEFT-style matching), or None.

    ``report``: the model's :class:`~kolora_probe.model.structure.StructureReport` when the caller has it already
    (built from ``config`` on the meta device otherwise)."""
    from kolora_probe.lora.count import TargetError, resolve_target_parameters, resolve_targets

    if report is None:
        from kolora_probe.model.meta import build_meta_model
        from kolora_probe.model.structure import analyze_model

        report = analyze_model(build_meta_model(config))
    try:
        resolve_targets(report, plan.lora.target_modules, plan.lora.modules_to_save)
        resolve_target_parameters(report, plan.lora.target_parameters)
    except TargetError as exc:
        return str(exc)
    return None
