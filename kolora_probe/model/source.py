"""Where a model comes from: a local directory, the Hugging Face cache, or the hub.

:func:`resolve_model_source` never substitutes another model: it either finds the files of the model
that was asked for, or raises :class:`ModelNotFound` with one line saying what was tried and how to fix it.

The hub is asked only when a file is neither local nor cached, and at most one short probe per process
(:func:`hub_status`) decides whether it is reachable: an unreachable hub makes the rest of the run offline
(no retries with back-off), and :func:`hub_status` says so once.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

HUB_PROBE_TIMEOUT_S = 3.0   # one HEAD request to the hub's endpoint; an answer of any status means reachable


class ModelNotFound(FileNotFoundError):
    """The requested model could not be found; the message is one actionable line."""


class RemoteCodeRefused(ValueError):
    """The model needs its repository's own Python code (trust_remote_code), which kolora-probe refuses."""


class ModelConfigError(ValueError):
    """The model's ``config.json`` cannot be used (not JSON, unknown architecture, not a causal LM); one line."""


@dataclass(frozen=True)
class ModelSource:
    model_id: str                 # what the user asked for (hub id or directory)
    kind: str                     # "local" | "cache" | "hub"
    path: Path                    # a local directory holding config.json (snapshot dir for cache/hub)
    revision: str = "main"
    attempts: tuple[str, ...] = field(default_factory=tuple)

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(sorted(p.name for p in self.path.iterdir() if p.is_file()))


def short(text: str, limit: int = 200, quote: bool = True) -> str:
    """``text`` for a one-line message (repr'd unless ``quote`` is False), cut to ``limit`` characters with the
    full length named: a 5,000-character option is identified, not replayed."""
    if len(text) <= limit:
        return repr(text) if quote else text
    cut = text[:limit]
    return (repr(cut) if quote else cut) + f"… ({len(text):,} characters)"


# config.json keys that size the model: each must be an integer >= 1 when present (null: the class's default)
SIZE_KEYS = ("vocab_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "num_layers",
             "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "n_inner", "ffn_dim",
             "n_positions", "max_position_embeddings", "head_dim", "num_local_experts", "num_experts")


def check_sizes(raw: dict, path: Path) -> None:
    """Raise ModelConfigError naming the first size key of ``raw`` (config.json) that is not an integer >= 1."""
    for key in SIZE_KEYS:
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelConfigError(f"{path}: {key} = {short(json_text(value), 60, quote=False)} is invalid; "
                                   f"expected an integer >= 1; fix config.json (re-download it or write it with "
                                   f"save_pretrained())")


def json_text(value) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def hub_offline() -> bool:
    """True when huggingface_hub is told not to use the network (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "") in ("1", "true", "TRUE")


@dataclass(frozen=True)
class HubStatus:
    """Whether this process may use the hub, decided once (:func:`hub_status`)."""
    reachable: bool
    endpoint: str
    reason: str = ""            # why not: the probe's error, whole, on one line
    probe_s: float = 0.0

    def describe(self) -> str:
        if self.reachable:
            return f"hub {self.endpoint}: reachable ({self.probe_s:.2f} s probe)"
        return (f"hub {self.endpoint} is unreachable ({self.reason}); this run works offline from here on "
                f"(set HF_HUB_OFFLINE=1 to skip the probe)")


_HUB_STATUS: HubStatus | None = None


def one_line(exc: BaseException) -> str:
    """``Type: message`` with the message whole, its lines and runs of spaces joined by single spaces."""
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_network_error(exc: BaseException) -> bool:
    """True for a failure to reach the hub (connection, DNS, timeout, proxy), not an answer from it."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return True
    if isinstance(exc, HfHubHTTPError):
        return False
    seen: BaseException | None = exc
    while seen is not None:
        module = type(seen).__module__.split(".")[0]
        if isinstance(seen, (OSError, TimeoutError)) or module in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def hub_status(probe: bool = True) -> HubStatus | None:
    """The hub's status for this process: probed once (one HEAD to the endpoint, HUB_PROBE_TIMEOUT_S, no retries)
    the first time it is needed; None when ``probe`` is False and nothing is known yet."""
    global _HUB_STATUS
    if _HUB_STATUS is None and probe:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        t0 = time.perf_counter()
        try:
            get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
            _HUB_STATUS = HubStatus(True, constants.ENDPOINT, probe_s=time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - any failure to get an answer means "unreachable"
            _HUB_STATUS = HubStatus(False, constants.ENDPOINT, one_line(exc), time.perf_counter() - t0)
    return _HUB_STATUS


def mark_hub_unreachable(exc: BaseException) -> None:
    """A hub call failed to reach the hub: the rest of the run is offline (honours a failed lookup)."""
    global _HUB_STATUS
    from huggingface_hub import constants

    _HUB_STATUS = HubStatus(False, constants.ENDPOINT, one_line(exc))


def reset_hub_status() -> None:
    """Forget the probe's answer (tests)."""
    global _HUB_STATUS
    _HUB_STATUS = None


def hub_usable() -> bool:
    """True when files may be downloaded from the hub now: not offline by setting, and the probe got an answer."""
    if hub_offline():
        return False
    status = hub_status()
    return status is not None and status.reachable


def _looks_like_repo_id(model_id: str) -> bool:
    parts = model_id.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not model_id.startswith(("/", "~"))


def resolve_model_source(model_id: str, revision: str = "main") -> ModelSource:
    """Find ``config.json`` for ``model_id``: local dir, then HF cache, then the hub (unless offline)."""
    attempts: list[str] = []
    local = Path(model_id).expanduser()
    try:
        is_dir = local.is_dir()
    except (OSError, ValueError) as exc:    # ENAMETOOLONG, a NUL byte, ...
        raise ModelNotFound(f"model {short(model_id)} cannot be a path here ({type(exc).__name__}: "
                            f"{getattr(exc, 'strerror', None) or exc}); fix: pass --model (or [model].id) a hub id "
                            f"(org/name) or an existing directory") from None
    if is_dir:
        if (local / "config.json").is_file():
            return ModelSource(model_id, "local", local.resolve(), revision, (f"local directory {local}: found",))
        raise ModelNotFound(
            f"model directory {local} has no config.json; fix: point --model (or [model].id in the plan) at a directory "
            f"written by save_pretrained(), or add its config.json")
    attempts.append(f"local directory {short(str(local), quote=False)}: does not exist")
    if not _looks_like_repo_id(model_id):
        raise ModelNotFound(f"model {short(model_id)} not found: {'; '.join(attempts)}; it is not a hub id either "
                            f"(org/name); fix --model or [model].id in the plan")

    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return ModelSource(model_id, "cache", Path(cached).parent, revision,
                           tuple(attempts + [f"HF cache {constants.HF_HUB_CACHE}: found"]))
    attempts.append(f"HF cache {constants.HF_HUB_CACHE}: not cached")
    if hub_offline():
        attempts.append("hub: skipped (HF_HUB_OFFLINE is set)")
    elif not hub_usable():
        status = hub_status()
        attempts.append(f"hub {status.endpoint}: unreachable ({status.reason}), so this run is offline")
    else:
        try:
            path = hf_hub_download(model_id, "config.json", revision=revision)
            return ModelSource(model_id, "hub", Path(path).parent, revision, tuple(attempts + ["hub: downloaded"]))
        except Exception as exc:  # noqa: BLE001 - any hub failure is reported whole, never hidden or cut
            if is_network_error(exc):
                mark_hub_unreachable(exc)
            attempts.append(f"hub: {one_line(exc)}")
    raise ModelNotFound(
        f"model {short(model_id)} (revision {short(revision, quote=False)}) not found; tried " + "; ".join(attempts)
        + ". Fix: pass --model DIR with a local copy (save_pretrained), set HF_HOME to a cache that holds it, "
          "or run where the hub is reachable without HF_HUB_OFFLINE")


def load_config(source: ModelSource):
    """Load the model's ``PretrainedConfig`` without trusting remote code."""
    import json

    from transformers import AutoConfig

    path = source.path / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{path} is not valid JSON ({exc}); fix: re-download it or write it with "
                               f"save_pretrained()") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path} holds a JSON {type(raw).__name__}, not an object; fix: re-download it or "
                               f"write it with save_pretrained()")
    check_sizes(raw, path)
    if "auto_map" in raw:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if raw.get("model_type") not in CONFIG_MAPPING:
            raise RemoteCodeRefused(
                f"{source.model_id}: config.json declares auto_map (custom code) and model_type "
                f"{raw.get('model_type')!r} is not built into transformers; kolora-probe never sets "
                f"trust_remote_code=True. Fix: use a model whose architecture transformers ships, or a converted copy")
    from huggingface_hub.errors import StrictDataclassError

    try:
        return AutoConfig.from_pretrained(str(source.path), trust_remote_code=False)
    except (StrictDataclassError, TypeError, AttributeError, ZeroDivisionError) as exc:
        # a value of the wrong type or an impossible one (e.g. "vocab_size": "1600"): transformers' own validation
        import transformers

        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        raise ModelConfigError(f"{path}: transformers {transformers.__version__} rejects it ("
                               f"{short(' '.join(lines), 240, quote=False)}); fix config.json (re-download it or "
                               f"write it with save_pretrained())") from None
    except (ValueError, KeyError) as exc:
        if "trust_remote_code" in str(exc):
            raise RemoteCodeRefused(f"{source.model_id}: needs trust_remote_code=True, which kolora-probe refuses "
                                    f"({str(exc).splitlines()[0][:200]})") from None
        import transformers

        model_type = raw.get("model_type")
        if not model_type:
            raise ModelConfigError(f"{path} has no model_type; fix: re-download it or write it with "
                                   f"save_pretrained()") from None
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise ModelConfigError(
                f"{path}: model_type {model_type!r} is not known to transformers {transformers.__version__}; fix: "
                f"upgrade transformers (pip install -U transformers) or use a model whose architecture it "
                f"ships") from None
        first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        raise ModelConfigError(f"{path}: transformers {transformers.__version__} cannot read it ({first}); fix: "
                               f"re-download it or write it with save_pretrained()") from None


def resolve_config(model_id: str, revision: str = "main"):
    """(ModelSource, PretrainedConfig) for ``model_id``. Raises ModelNotFound, RemoteCodeRefused or
    ModelConfigError (one line)."""
    source = resolve_model_source(model_id, revision)
    return source, load_config(source)
