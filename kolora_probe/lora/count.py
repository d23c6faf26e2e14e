"""Exact LoRA trainable-parameter counts, analytic and by PEFT, with the consequences of the chosen targets.

Analytic count per targeted layer: ``r * (in_features + out_features)`` (LoRA A is r×in, B is out×r; for an
embedding A is r×num_embeddings, B is dim×r), plus biases (``bias="all"``: every ``*.bias`` parameter;
``"lora_only"``: the targeted layers' biases) and the full parameters of ``modules_to_save`` layers. The same
targets are applied with PEFT (``get_peft_model`` on a fresh meta-device model: no weights, no memory) and
``get_nb_trainable_parameters()`` must give the same number.

Target names are matched like PEFT (exact name or dotted suffix; ``["all-linear"]`` is PEFT's shorthand for every
Linear/Conv1D layer except the output head). :func:`resolve_targets` raises
:class:`TargetError` (one line, with the fix) for an empty list, a name that matches nothing (listing close names)
or a name that matches only modules LoRA cannot wrap.
"""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kolora_probe.lora.config import is_all_linear
from kolora_probe.model.structure import CONV1D, EMBEDDING, Layer, StructureReport, matches_target, suffix_index

FIX = "fix [lora].target_modules or --targets"
PEFT_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES
LORA_ADAPTER_BYTES_PER_PARAM = 4  # PEFT keeps adapter weights in float32 (autocast_adapter_dtype=True)


class TargetError(ValueError):
    """The LoRA target list cannot be applied; the message is one line with the fix."""


@dataclass(frozen=True)
class Finding:
    code: str        # embedding_saved | tied_target | conv1d_fan_in_fan_out | partial_kind | fused_params |
                     # adapter_size
    severity: str    # info | warning
    message: str


@dataclass(frozen=True)
class TargetMatch:
    target: str
    modules: tuple[str, ...]        # adaptable layers it matches


@dataclass(frozen=True)
class ModuleCount:
    name: str
    kind: str
    in_features: int
    out_features: int
    role: str
    r: int
    lora_params: int                # r * (in + out)
    bias_params: int = 0            # trainable bias of this layer (bias="all"/"lora_only")


@dataclass(frozen=True)
class ParameterCount:
    """LoRA on one weight tensor through PEFT's ``target_parameters`` (``lora.ParamWrapper``). A 3-D tensor of
    ``E`` experts stored (E, out, in) gets A of (r·E) × in and B of out × (r·E): ``r·E·(in + out)``."""
    name: str
    module_kind: str
    shape: tuple[int, ...]
    lora_params: int


def lora_params_of_tensor(shape: Sequence[int], r: int) -> int:
    """LoRA parameters PEFT adds for one targeted weight tensor (2-D: out × in; 3-D: experts × out × in)."""
    if len(shape) == 2:
        return r * (shape[0] + shape[1])
    if len(shape) == 3:
        return r * shape[0] * (shape[1] + shape[2])
    raise TargetError(f"a {len(shape)}-D weight tensor cannot be adapted by LoRA; fix [lora].target_parameters")


def resolve_target_parameters(report: StructureReport, target_parameters: Sequence[str]) -> tuple[TargetMatch, ...]:
    """Match each ``target_parameters`` entry like PEFT (full parameter name or dotted suffix) against the weight
    tensors held by modules LoRA cannot wrap. Raises TargetError naming the candidates."""
    problems: list[str] = []
    matches: list[TargetMatch] = []
    names = [f.name for f in report.fused]
    for t in (x.strip() for x in target_parameters):
        hit = tuple(n for n in names if matches_target(n, t))
        if not hit:
            cands = sorted({".".join(n.split(".")[-2:]) for n in names})
            close = difflib.get_close_matches(t, cands, n=5, cutoff=0.6)
            problems.append(f"target parameter {t!r} matches no weight tensor outside adaptable layers; " + (
                f"close names: {', '.join(close)}" if close else
                (f"candidates: {', '.join(cands)}" if cands else "this model has none (use target_modules)")))
        matches.append(TargetMatch(t, hit))
    if problems:
        raise TargetError("; ".join(problems) + "; fix [lora].target_parameters or --target-parameters")
    return tuple(matches)


@dataclass(frozen=True)
class LoraCount:
    targets: tuple[str, ...]
    r: int
    alpha: float
    bias: str
    modules_to_save: tuple[str, ...]
    matches: tuple[TargetMatch, ...]
    modules: tuple[ModuleCount, ...]
    lora_params: int                # sum of r*(in+out)
    bias_params: int
    modules_to_save_params: int
    trainable_params: int           # analytic total
    total_params: int               # base model, shared parameters once
    peft_trainable_params: int | None
    peft_all_params: int | None
    findings: tuple[Finding, ...]
    adapter_bytes: int              # approximate size of the saved adapter (incl. a saved embedding when tied)
    peft_warnings: tuple[str, ...] = field(default=())
    target_parameters: tuple[str, ...] = ()
    parameters: tuple[ParameterCount, ...] = ()   # LoRA on weight tensors (PEFT target_parameters)

    @property
    def all_params(self) -> int:
        """Base parameters plus the adapter (PEFT's 'all params')."""
        return self.total_params + self.lora_params + self.modules_to_save_params

    @property
    def trainable_percent(self) -> float:
        """PEFT's trainable% (print_trainable_parameters): trainable / all params incl. the adapter."""
        return 100.0 * self.trainable_params / self.all_params if self.all_params else 0.0

    @property
    def trainable_percent_of_base(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def agrees_with_peft(self) -> bool:
        return self.peft_trainable_params == self.trainable_params

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets), "r": self.r, "alpha": self.alpha, "bias": self.bias,
            "modules_to_save": list(self.modules_to_save),
            "total_params": self.total_params, "all_params": self.all_params,
            "trainable_params": self.trainable_params, "trainable_percent": round(self.trainable_percent, 6),
            "trainable_percent_of_base": round(self.trainable_percent_of_base, 6),
            "lora_params": self.lora_params, "bias_params": self.bias_params,
            "modules_to_save_params": self.modules_to_save_params,
            "peft_trainable_params": self.peft_trainable_params, "peft_all_params": self.peft_all_params,
            "agrees_with_peft": self.agrees_with_peft, "adapter_bytes": self.adapter_bytes,
            "matches": [{"target": m.target, "modules": len(m.modules)} for m in self.matches],
            "modules": [{"name": m.name, "kind": m.kind, "in_features": m.in_features,
                         "out_features": m.out_features, "role": m.role, "lora_params": m.lora_params,
                         "bias_params": m.bias_params} for m in self.modules],
            "findings": [{"code": f.code, "severity": f.severity, "message": f.message} for f in self.findings],
            "peft_warnings": list(self.peft_warnings),
            "target_parameters": list(self.target_parameters),
            "parameters": [{"name": p.name, "kind": p.module_kind, "shape": list(p.shape),
                            "lora_params": p.lora_params} for p in self.parameters],
        }


# --- target resolution -------------------------------------------------------------------------------
def _candidate_names(report: StructureReport, depth: int) -> list[str]:
    """Names a user could have meant: the last ``depth`` dotted parts of every adaptable layer's name."""
    out: list[str] = []
    for l in report.layers:
        s = ".".join(l.name.split(".")[-depth:])
        if s not in out:
            out.append(s)
    return out


def close_names(target: str, report: StructureReport, n: int = 5) -> list[str]:
    """Layer names close to ``target`` (difflib), compared at the target's own depth (``c_atn`` → ``c_attn``)."""
    depth = target.count(".") + 1
    return difflib.get_close_matches(target, _candidate_names(report, depth), n=n, cutoff=0.6)


def _excluded_by_modules_to_save(name: str, modules_to_save: Sequence[str]) -> bool:
    import re

    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


def resolve_targets(report: StructureReport, targets: Sequence[str],
                    modules_to_save: Sequence[str] = ()) -> tuple[TargetMatch, ...]:
    """Match each target like PEFT. Raises TargetError for an empty list, unmatched or unsupported names."""
    targets = list(dict.fromkeys(t.strip() for t in targets))   # PEFT keeps target_modules as a set
    if not targets or not all(targets):
        raise TargetError(f"LoRA target list is empty; name at least one layer, e.g. "
                          f"{', '.join(report.suggested[0].targets) if report.suggested else 'lm_head'}; {FIX}")
    layer_set = {l.name for l in report.layers}
    allowed = {n for n in layer_set if not _excluded_by_modules_to_save(n, modules_to_save)}
    layer_names = [l.name for l in report.layers if l.name in allowed]
    if is_all_linear(targets):
        # PEFT's shorthand: every Linear/Conv1D layer except the output embedding (embeddings are not Linear)
        hit = tuple(n for n in layer_names if report.layer(n).kind != EMBEDDING and report.layer(n).role != "output_head")
        if not hit:
            raise TargetError(f"target 'all-linear' matches no Linear/Conv1D layer besides the head; {FIX}")
        return (TargetMatch(targets[0], hit),)
    index = suffix_index(report.module_names)     # one pass over the modules, then one lookup per target
    kinds = dict(zip(report.module_names, report.module_kinds))
    problems: list[str] = []
    failed = 0
    no_close = False          # some unmatched target has no close name: list the model's layer names once
    matches: list[TargetMatch] = []
    for t in targets:
        named = index.get(t, ())
        hit = tuple(n for n in named if n in allowed)
        other = sorted({kinds[n] for n in named if n not in layer_set})
        problem = None
        if other:
            inside = sorted({l.leaf for n in named if n not in layer_set for l in report.layers
                             if l.name.startswith(n + ".")}) if len(problems) < MAX_PROBLEMS else []
            problem = (f"target {_short(t)} matches modules LoRA cannot wrap ({', '.join(other)})"
                       + (f"; name a layer inside instead: {', '.join(inside)}" if inside else ""))
        elif not hit and named:
            problem = (f"target {_short(t)} only matches layers that modules_to_save {list(modules_to_save)} "
                       f"also names (PEFT never adapts those); remove it from one of the two lists")
        elif not hit:
            if len(problems) < MAX_PROBLEMS:    # difflib per unmatched name: only for the ones echoed
                close = close_names(t, report)
                problem = f"target {_short(t)} matches no module" + (f"; close names: {', '.join(close)}" if close
                                                                      else "")
                no_close = no_close or not close
            else:
                problem = "unmatched"
        if problem:
            failed += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(problem)
        matches.append(TargetMatch(t, hit))
    if problems:
        more = f"; and {failed - len(problems):,} more of the {len(targets):,} targets" if failed > len(problems) else ""
        leaves = (f"; layer names in this model: {', '.join(sorted({l.leaf for l in report.layers}))}"
                  if no_close else "")
        raise TargetError("; ".join(problems) + more + leaves + f"; {FIX}")
    return tuple(matches)


MAX_PROBLEMS = 5        # a target list of millions of names is reported by its first few problems and a count
MAX_ECHO = 80           # characters of one user-supplied name echoed in a message


def _short(name: str) -> str:
    """``repr(name)``, cut to :data:`MAX_ECHO` characters (a message names the input, it does not replay it)."""
    return repr(name) if len(name) <= MAX_ECHO else repr(name[:MAX_ECHO]) + f"… ({len(name):,} characters)"


def echo_list(items: Sequence[str], limit: int = 10) -> str:
    """A list for one line of output: the first ``limit`` items and how many more."""
    shown = ", ".join(_short(x) for x in items[:limit])
    return f"[{shown}" + (f", … {len(items) - limit:,} more]" if len(items) > limit else "]")


# --- counting ----------------------------------------------------------------------------------------
def lora_params_of(layer: Layer, r: int) -> int:
    """LoRA A (r × in) plus B (out × r)."""
    return r * (layer.in_features + layer.out_features)


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 100_000 else f"{n_bytes / 1e3:.1f} kB"


def _findings(report: StructureReport, model: Any, targeted: list[Layer], matches: tuple[TargetMatch, ...],
              lora_params: int, targeted_params: frozenset[str] = frozenset()) -> tuple[list[Finding], int]:
    findings: list[Finding] = []
    params = dict(model.named_parameters(remove_duplicate=False))
    targeted_names = {l.name for l in targeted}

    # PEFT's save_pretrained(save_embedding_layers="auto") stores the full weight of the targeted input/output
    # embedding when a target is literally one of EMBEDDING_LAYER_NAMES (peft.utils.save_and_load)
    saved: dict[int, tuple[str, Any]] = {}
    if any(m.target in PEFT_EMBEDDING_LAYER_NAMES for m in matches):
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            emb = getattr(model, getter, lambda: None)()
            name = next((n for n, mod in model.named_modules() if mod is emb), None) if emb is not None else None
            w = params.get(f"{name}.weight") if name else None
            if name in targeted_names and w is not None:
                saved.setdefault(id(w), (name, w))
    extra_bytes = sum(int(w.numel()) * w.element_size() for _, w in saved.values())
    saved_names = {n for n, _ in saved.values()}
    for name, w in saved.values():
        findings.append(Finding("embedding_saved", "warning", (
            f"target {name.rsplit('.', 1)[-1]!r} is one of PEFT's embedding layer names: save_pretrained stores the "
            f"full {name} weight ({'×'.join(str(x) for x in w.shape)}, ~{_mb(int(w.numel()) * w.element_size())}) "
            f"with the adapter; pass save_embedding_layers=False to keep only the LoRA weights")))
    for l in targeted:
        if l.tied_with:
            w = params.get(f"{l.name}.weight")
            partner = ("the input embedding" if l.role == "output_head" else
                       "the output head" if l.role == "embedding" else "the tied module")
            size = (f"PEFT saves the full {'×'.join(str(x) for x in w.shape)} shared weight with the adapter "
                    f"(~{_mb(int(w.numel()) * w.element_size())}), and " if l.name in saved_names and w is not None
                    else "")
            findings.append(Finding("tied_target", "warning", (
                f"{l.name} is tied to {', '.join(l.tied_with)}: {size}merging the adapter changes {partner} "
                f"({', '.join(t.removesuffix('.weight') for t in l.tied_with)}) too; target other layers if it must stay unchanged")))
    conv = [l for l in targeted if l.kind == CONV1D]
    if conv:
        findings.append(Finding("conv1d_fan_in_fan_out", "info", (
            f"{len(conv)} targeted layer(s) are transformers Conv1D (weight stored in×out, e.g. {conv[0].name}): "
            f"PEFT sets fan_in_fan_out=True for them (with a warning); set fan_in_fan_out=True in LoraConfig")))
    leaves = {}
    for l in report.layers:
        leaves.setdefault(l.leaf, []).append(l.name)
    for m in matches:
        by_leaf: dict[str, int] = {}
        for n in m.modules:
            leaf = n.rsplit(".", 1)[-1]
            by_leaf[leaf] = by_leaf.get(leaf, 0) + 1
        for leaf, k in by_leaf.items():
            total = len(leaves.get(leaf, ()))
            if k < total:
                missed = next(n for n in leaves[leaf] if not matches_target(n, m.target))
                findings.append(Finding("partial_kind", "info", (
                    f"target {m.target!r} matches {k} of {total} layers named {leaf!r} "
                    f"(not e.g. {missed}); use {leaf!r} to adapt all of them")))
    frozen = [f for f in report.fused if f.name not in targeted_params]
    if frozen:
        f0 = max(frozen, key=lambda f: f.numel)
        n_frozen = sum(f.numel for f in frozen)
        share = 100.0 * n_frozen / report.total_params if report.total_params else 0.0
        findings.append(Finding("fused_params", "warning" if share >= 10 else "info", (
            f"{n_frozen:,} parameters ({share:.1f} % of the model) sit in {len(frozen)} weight "
            f"tensor(s) that target_modules cannot reach (e.g. {f0.name}, {f0.module_kind} "
            f"{'×'.join(map(str, f0.shape))}): this adapter leaves them frozen; PEFT adapts them only through "
            f"LoraConfig(target_parameters=[...]): [lora].target_parameters or --target-parameters")))
    adapter = lora_params * LORA_ADAPTER_BYTES_PER_PARAM + extra_bytes
    findings.append(Finding("adapter_size", "info", (
        f"saved adapter ≈ {_mb(adapter)} ({lora_params:,} LoRA parameters in fp32"
        + (f" + saved embedding weights {_mb(extra_bytes)}" if extra_bytes else "") + ")")))
    return findings, adapter


def count_lora(model: Any, targets: Sequence[str], r: int, alpha: float | None = None, bias: str = "none",
               modules_to_save: Sequence[str] = (), *, report: StructureReport | None = None,
               peft_model_factory: Callable[[], Any] | None = None,
               target_parameters: Sequence[str] = ()) -> LoraCount:
    """Analytic LoRA count on ``model`` (meta-device or loaded; not modified), checked with PEFT.

    ``peft_model_factory`` builds a fresh model for ``get_peft_model`` (PEFT replaces layers in place); by default
    a meta-device model from ``model.config``. Pass ``lambda: None`` to skip the PEFT count.
    """
    from kolora_probe.model.structure import analyze_model

    if r < 1:
        raise ValueError(f"LoRA rank r={r} is invalid; expected an integer >= 1")
    alpha = float(alpha if alpha is not None else 2 * r)
    report = report or analyze_model(model)
    targets = tuple(dict.fromkeys(t.strip() for t in targets))   # PEFT keeps target_modules as a set
    modules_to_save = tuple(modules_to_save)
    matches = resolve_targets(report, targets, modules_to_save)
    targeted_names = {n for m in matches for n in m.modules}
    targeted = [l for l in report.layers if l.name in targeted_names]

    params = dict(model.named_parameters())  # de-duplicated (shared tensors once)
    from kolora_probe.model.structure import param_numel

    bias_params = 0
    per_bias: dict[str, int] = {}
    if bias == "all":
        bias_params = sum(param_numel(p) for n, p in params.items() if n == "bias" or n.endswith(".bias"))
        for l in targeted:
            b = params.get(f"{l.name}.bias")
            per_bias[l.name] = param_numel(b) if b is not None else 0
    elif bias == "lora_only":
        for l in targeted:
            b = params.get(f"{l.name}.bias")
            per_bias[l.name] = param_numel(b) if b is not None else 0
        bias_params = sum(per_bias.values())
    elif bias != "none":
        raise ValueError(f"bias={bias!r} is invalid; expected one of 'none', 'all', 'lora_only'")

    mts_params = 0
    if modules_to_save:
        mods = dict(model.named_modules(remove_duplicate=False))
        hit = [n for n in mods if n and any(n.endswith(m) for m in modules_to_save)]
        if not hit:
            raise TargetError(f"modules_to_save {list(modules_to_save)} match no module; fix [lora].modules_to_save")
        seen: set[int] = set()
        for n in hit:
            for p in mods[n].parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    mts_params += param_numel(p)

    rows = tuple(ModuleCount(l.name, l.kind, l.in_features, l.out_features, l.role, r, lora_params_of(l, r),
                             per_bias.get(l.name, 0)) for l in targeted)
    target_parameters = tuple(t.strip() for t in target_parameters)
    pmatches = resolve_target_parameters(report, target_parameters)
    pnames = {n for m in pmatches for n in m.modules}
    prow = tuple(ParameterCount(f.name, f.module_kind, f.shape, lora_params_of_tensor(f.shape, r))
                 for f in report.fused if f.name in pnames)
    lora_total = sum(m.lora_params for m in rows) + sum(p.lora_params for p in prow)
    trainable = lora_total + bias_params + mts_params

    findings, adapter_bytes = _findings(report, model, targeted, matches, lora_total, frozenset(pnames))

    peft_trainable = peft_all = None
    peft_warnings: tuple[str, ...] = ()
    fresh = peft_model_factory() if peft_model_factory is not None else _fresh_meta(model)
    if fresh is not None:
        peft_trainable, peft_all, peft_warnings = peft_count(fresh, targets, r, alpha, bias, modules_to_save,
                                                             conv1d=any(l.kind == CONV1D for l in targeted),
                                                             target_parameters=target_parameters)
    return LoraCount(targets=targets, r=r, alpha=alpha, bias=bias, modules_to_save=modules_to_save,
                     matches=matches, modules=rows, lora_params=lora_total, bias_params=bias_params,
                     modules_to_save_params=mts_params, trainable_params=trainable,
                     total_params=report.total_params, peft_trainable_params=peft_trainable,
                     peft_all_params=peft_all, findings=tuple(findings), adapter_bytes=adapter_bytes,
                     peft_warnings=peft_warnings, target_parameters=target_parameters, parameters=prow)


def _fresh_meta(model: Any) -> Any:
    from kolora_probe.model.meta import build_meta_model

    config = getattr(model, "config", None)
    if config is None:
        return None
    return build_meta_model(config)


def peft_count(model: Any, targets: Sequence[str], r: int, alpha: float, bias: str = "none",
               modules_to_save: Sequence[str] = (), conv1d: bool = False,
               target_parameters: Sequence[str] = ()) -> tuple[int, int, tuple[str, ...]]:
    """(trainable, all, warnings) from PEFT's ``get_nb_trainable_parameters()``; ``model`` is modified in place.

    Dropout is 0: it adds no parameters, so the count does not depend on it. The adapter weights are created on
    the meta device (accelerate's ``init_empty_weights``, PEFT's ``low_cpu_mem_usage``): counting LoRA r=256 on
    every linear layer of a 70B config allocates nothing."""
    from peft import get_peft_model

    from kolora_probe.lora.config import peft_lora_config

    config = peft_lora_config(targets, r, alpha, 0.0, bias, modules_to_save, fan_in_fan_out=conv1d,
                              target_parameters=target_parameters)
    from accelerate import init_empty_weights

    # the adapters PEFT adds are meta tensors too: nothing sized r × (in + out) is allocated for a count
    with warnings.catch_warnings(record=True) as caught, init_empty_weights():
        warnings.simplefilter("always")
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
        trainable, total = peft_model.get_nb_trainable_parameters()
    msgs = tuple(dict.fromkeys(str(w.message).splitlines()[0][:300] for w in caught
                               if "deprecated" not in str(w.message)))
    return int(trainable), int(total), msgs


def count_for_plan(plan: Any, model: Any = None, report: StructureReport | None = None) -> LoraCount:
    """Count the plan's ``[lora]`` on ``model`` (default: the plan's model on the meta device, config only)."""
    if model is None:
        from kolora_probe.model.meta import build_meta_model
        from kolora_probe.model.source import load_config, resolve_model_source

        model = build_meta_model(load_config(resolve_model_source(plan.model.id, plan.model.revision)))
    lo = plan.lora
    return count_lora(model, lo.target_modules, lo.r, lo.alpha, lo.bias, lo.modules_to_save, report=report,
                      target_parameters=lo.target_parameters)
