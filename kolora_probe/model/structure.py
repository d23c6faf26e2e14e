"""Structure of a causal LM for LoRA: adaptable layers, their roles, tied parameters and suggested targets.

:func:`analyze_model` works on a meta-device model (``build_meta_model(load_config(resolve_model_source(id)))``,
no weights) or on a loaded one (also with bitsandbytes-quantized layers). Adaptable layers are what PEFT's LoRA
can wrap: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2; weight stored as (in, out)), bitsandbytes
``Linear4bit``/``Linear8bitLt`` and ``nn.Embedding``. Each gets a role (attention / mlp / output_head / embedding /
other) from architecture rules (GPT-2, LLaMA-style, GPT-NeoX, OPT) with a name-based fallback for the rest.

Target names follow PEFT's matching (``peft.tuners.tuners_utils.check_target_module_exists``): a target
matches a module whose full name equals it or ends with ``"." + target``; :func:`matches_target` is that rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

ROLES = ("attention", "mlp", "output_head", "embedding", "other")

# kind names as reported
LINEAR, CONV1D, LINEAR4BIT, LINEAR8BIT, EMBEDDING = "Linear", "Conv1D", "Linear4bit", "Linear8bitLt", "Embedding"

# Architecture rules: (family, model_types, {dotted name suffix: role}). A module's role is the role of the longest
# suffix that matches its name (PEFT-style suffix match on dot boundaries).
ARCH_RULES: tuple[tuple[str, tuple[str, ...], dict[str, str]], ...] = (
    ("gpt2", ("gpt2",), {
        "attn.c_attn": "attention", "attn.q_attn": "attention", "attn.c_proj": "attention",
        "crossattention.c_attn": "attention", "crossattention.q_attn": "attention",
        "crossattention.c_proj": "attention",
        "mlp.c_fc": "mlp", "mlp.c_proj": "mlp"}),
    ("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite",
               "cohere", "starcoder2", "mixtral"), {
        "q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}),
    ("gpt_neox", ("gpt_neox",), {
        "attention.query_key_value": "attention", "attention.dense": "attention",
        "mlp.dense_h_to_4h": "mlp", "mlp.dense_4h_to_h": "mlp"}),
    ("opt", ("opt",), {
        "self_attn.q_proj": "attention", "self_attn.k_proj": "attention", "self_attn.v_proj": "attention",
        "self_attn.out_proj": "attention", "fc1": "mlp", "fc2": "mlp"}),
)
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward")


@dataclass(frozen=True)
class Layer:
    """One adaptable module."""
    name: str                 # full module name, e.g. "transformer.h.0.attn.c_attn"
    kind: str                 # Linear | Conv1D | Linear4bit | Linear8bitLt | Embedding
    in_features: int          # Embedding: num_embeddings
    out_features: int         # Embedding: embedding_dim
    role: str                 # one of ROLES
    has_bias: bool
    params: int               # parameters of the module itself (weight + bias; 4-bit counted unpacked)
    tied_with: tuple[str, ...] = ()   # other parameter names sharing this module's weight

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class TiedGroup:
    """Parameter names that refer to one shared tensor (counted once in the total)."""
    names: tuple[str, ...]
    numel: int


@dataclass(frozen=True)
class FusedParameter:
    """A weight matrix (≥ 2-D) held by a module LoRA's ``target_modules`` cannot wrap, e.g. the 3-D expert tensors
    of a mixture-of-experts block (transformers 5 ``MixtralExperts.gate_up_proj``) or a router weight. PEFT can
    adapt such a tensor only through ``LoraConfig(target_parameters=[...])``."""
    name: str                 # full parameter name, e.g. "model.layers.0.mlp.experts.gate_up_proj"
    module_kind: str          # class name of the owning module, e.g. "MixtralExperts"
    shape: tuple[int, ...]
    numel: int


@dataclass(frozen=True)
class TargetSet:
    name: str                 # attention-only | attention+mlp | all-linear-without-head
    targets: tuple[str, ...]  # PEFT target_modules
    modules: int              # how many layers the targets match


@dataclass(frozen=True)
class StructureReport:
    model_type: str
    architecture: str                 # class name of the model
    family: str                       # gpt2 | llama | gpt_neox | opt | generic
    total_params: int                 # shared parameters counted once
    total_params_if_untied: int       # every parameter name counted (what a lost tie would give)
    layers: tuple[Layer, ...]
    tied_groups: tuple[TiedGroup, ...]
    suggested: tuple[TargetSet, ...]
    module_names: tuple[str, ...] = field(repr=False, default=())   # every named module (for matching)
    module_kinds: tuple[str, ...] = field(repr=False, default=())    # class name per module_names entry
    fused: tuple[FusedParameter, ...] = ()   # weight matrices no target_modules entry can reach

    @property
    def fused_params(self) -> int:
        return sum(f.numel for f in self.fused)

    def by_role(self) -> dict[str, tuple[Layer, ...]]:
        return {role: tuple(l for l in self.layers if l.role == role) for role in ROLES}

    def layer(self, name: str) -> Layer:
        by_name = self.__dict__.get("_by_name")
        if by_name is None:   # built once (frozen dataclass: stored past __setattr__)
            by_name = {l.name: l for l in self.layers}
            object.__setattr__(self, "_by_name", by_name)
        return by_name[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type, "architecture": self.architecture, "family": self.family,
            "total_params": self.total_params, "total_params_if_untied": self.total_params_if_untied,
            "layers": [{"name": l.name, "kind": l.kind, "in_features": l.in_features,
                        "out_features": l.out_features, "role": l.role, "has_bias": l.has_bias,
                        "params": l.params, "tied_with": list(l.tied_with)} for l in self.layers],
            "roles": {role: len(ls) for role, ls in self.by_role().items()},
            "tied_groups": [{"names": list(g.names), "numel": g.numel} for g in self.tied_groups],
            "suggested_targets": [{"name": s.name, "targets": list(s.targets), "modules": s.modules}
                                  for s in self.suggested],
            "fused_params": [{"name": f.name, "module_kind": f.module_kind, "shape": list(f.shape),
                              "numel": f.numel} for f in self.fused],
        }


# --- matching (PEFT's rule) --------------------------------------------------------------------------
def matches_target(module_name: str, target: str) -> bool:
    """PEFT's list-form target matching: exact name or a dotted suffix."""
    return module_name == target or module_name.endswith("." + target)


def suffix_index(names: Iterable[str]) -> dict[str, list[str]]:
    """Every dotted suffix of every name → the names it matches (``matches_target``), built in one pass over the
    names: looking a target up is then O(1) instead of a scan of all modules per target."""
    index: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        for k in range(len(parts)):
            index.setdefault(".".join(parts[k:]), []).append(name)
    return index


# --- layer classification ----------------------------------------------------------------------------
def layer_kind(module: Any) -> str | None:
    """The adaptable kind of ``module`` or None. Checks class names for bitsandbytes (never imports it)."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    cls = type(module)
    mro = {c.__name__ for c in cls.__mro__ if c.__module__.startswith("bitsandbytes")}
    if "Linear4bit" in mro:
        return LINEAR4BIT
    if "Linear8bitLt" in mro:
        return LINEAR8BIT
    if isinstance(module, Conv1D):
        return CONV1D
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    return None


def _features(module: Any, kind: str) -> tuple[int, int]:
    if kind == CONV1D:
        w = module.weight  # (in, out)
        return int(w.shape[0]), int(w.shape[1])
    if kind == EMBEDDING:
        return int(module.num_embeddings), int(module.embedding_dim)
    return int(module.in_features), int(module.out_features)


def param_numel(p: Any) -> int:
    import torch

    n = int(p.numel())
    if getattr(p, "quant_state", None) is not None and p.dtype == torch.uint8:
        n *= 2  # bitsandbytes Params4bit packs two 4-bit values per byte
    return n


def parameter_tensors(model: Any) -> tuple[TiedGroup, ...]:
    """Every distinct parameter tensor with the names it is reachable under (several when tied)."""
    names: dict[int, list[str]] = {}
    numel: dict[int, int] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
        numel[id(p)] = param_numel(p)
    return tuple(TiedGroup(tuple(ns), numel[i]) for i, ns in names.items())


def ties_word_embeddings(config: Any) -> bool:
    """The config asks for tied input/output embeddings (for a composite config: its text config does)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def family_of(model_type: str, layer_names: Iterable[str] = ()) -> str:
    """The architecture family whose rules apply: by model_type, else by the layer names seen."""
    for family, types, _ in ARCH_RULES:
        if model_type in types:
            return family
    names = list(layer_names)
    best, best_hits = "generic", 0
    for family, _, rules in ARCH_RULES:
        hits = sum(1 for n in names if any(matches_target(n, s) for s in rules))
        if hits > best_hits:
            best, best_hits = family, hits
    return best if best_hits >= 2 else "generic"


def role_of(name: str, kind: str, family: str, is_output_head: bool) -> str:
    """Role of one adaptable layer."""
    if is_output_head:
        return "output_head"
    if kind == EMBEDDING:
        return "embedding"
    for fam, _, rules in ARCH_RULES:
        if fam == family:
            hits = [s for s in rules if matches_target(name, s)]
            if hits:
                return rules[max(hits, key=len)]
    parts = name.lower().split(".")[:-1]  # the containers, not the layer itself
    if any(w in p for p in parts for w in _ATTENTION_WORDS):
        return "attention"
    if any(w in p for p in parts for w in _MLP_WORDS):
        return "mlp"
    leaf = name.rsplit(".", 1)[-1].lower()
    if leaf in ("lm_head", "embed_out", "output"):
        return "output_head"
    return "other"


# --- target-set suggestion ---------------------------------------------------------------------------
def minimal_targets(chosen: Iterable[str], all_names: Iterable[str],
                    index: dict[str, list[str]] | None = None) -> tuple[str, ...]:
    """Shortest PEFT target names (dotted suffixes) that match exactly ``chosen`` among ``all_names``
    (linear in the number of modules: each suffix's matches come from :func:`suffix_index`)."""
    chosen_set = set(chosen)
    index = suffix_index(all_names) if index is None else index
    out: dict[str, None] = {}
    exact: dict[str, bool] = {}      # suffix → it matches only chosen names (each suffix checked once)
    for name in sorted(chosen_set):
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if suffix not in exact:
                exact[suffix] = all(n in chosen_set for n in index.get(suffix, ()))
            if exact[suffix]:
                out.setdefault(suffix, None)
                break
    # drop suffixes made redundant by a shorter one already present
    return tuple(t for t in out if not any(".".join(t.split(".")[k:]) in out for k in range(1, t.count(".") + 1)))


def _suggest(layers: tuple[Layer, ...], module_names: tuple[str, ...]) -> tuple[TargetSet, ...]:
    # (name, roles it takes layers from, roles that must have layers for the name to be true)
    sets = (("attention-only", ("attention",), ("attention",)),
            ("attention+mlp", ("attention", "mlp"), ("attention", "mlp")),
            ("all-linear-without-head", ("attention", "mlp", "other"), ()))
    linear_names = {l.name for l in layers if l.role != "embedding"}
    present = {l.role for l in layers}
    index = suffix_index(module_names)
    out = []
    for name, roles, required in sets:
        chosen = [l.name for l in layers if l.role in roles]
        if not chosen or not set(required) <= present:
            continue   # e.g. no attention+mlp on a mixture-of-experts model whose MLP holds no Linear layer
        targets = minimal_targets(chosen, module_names, index)
        matched = len({n for t in targets for n in index.get(t, ()) if n in linear_names})
        out.append(TargetSet(name, targets, matched))
    return tuple(out)


def fused_parameters(model: Any, adaptable: Iterable[str]) -> tuple[FusedParameter, ...]:
    """Weight matrices (≥ 2-D parameters) owned by modules that are not adaptable layers (see FusedParameter)."""
    adaptable_set = set(adaptable)
    out: list[FusedParameter] = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        if mname in adaptable_set:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() < 2 or id(p) in seen:
                continue
            seen.add(id(p))
            out.append(FusedParameter(f"{mname}.{pname}" if mname else pname, type(module).__name__,
                                      tuple(int(x) for x in p.shape), param_numel(p)))
    return tuple(out)


# --- the analyser ------------------------------------------------------------------------------------
def analyze_model(model: Any) -> StructureReport:
    """Analyse a (meta-device or loaded) causal LM."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "") or "")

    tensors = parameter_tensors(model)
    total = sum(g.numel for g in tensors)
    total_untied = sum(g.numel * len(g.names) for g in tensors)
    tied = tuple(g for g in tensors if len(g.names) > 1)
    tied_of: dict[str, tuple[str, ...]] = {}
    for g in tied:
        for n in g.names:
            tied_of[n] = tuple(x for x in g.names if x != n)

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    module_names: list[str] = []
    module_kinds: list[str] = []
    raw: list[tuple[str, Any, str]] = []
    for mname, module in model.named_modules():
        if not mname:
            continue
        module_names.append(mname)
        module_kinds.append(type(module).__name__)
        kind = layer_kind(module)
        if kind is not None:
            raw.append((mname, module, kind))
    family = family_of(model_type, [n for n, _, k in raw if k != EMBEDDING])

    layers = []
    for mname, module, kind in raw:
        fin, fout = _features(module, kind)
        bias = getattr(module, "bias", None)
        has_bias = bias is not None and hasattr(bias, "numel")
        params = sum(param_numel(p) for p in module.parameters(recurse=False))
        weight_name = f"{mname}.weight"
        layers.append(Layer(name=mname, kind=kind, in_features=fin, out_features=fout,
                            role=role_of(mname, kind, family, module is out_emb and out_emb is not None),
                            has_bias=has_bias, params=params, tied_with=tied_of.get(weight_name, ())))
    layers_t = tuple(layers)
    return StructureReport(
        model_type=model_type, architecture=type(model).__name__, family=family, total_params=total,
        total_params_if_untied=total_untied, layers=layers_t, tied_groups=tied,
        suggested=_suggest(layers_t, tuple(module_names)), module_names=tuple(module_names),
        module_kinds=tuple(module_kinds), fused=fused_parameters(model, (n for n, _, _ in raw)))

