"""Load the plan's model weights once, safely: safetensors preferred, ``.bin`` only through weights-only unpickling.

:func:`load_model` resolves the model with :mod:`kolora_probe.model.source` (local dir, HF cache, hub), picks
the weight file (``model.safetensors`` or its shard index first, then ``pytorch_model.bin``), verifies it before
transformers touches it and loads it with ``trust_remote_code=False``. It never falls back to another model.

* safetensors: the header must parse and every tensor's byte range must match its dtype × shape and lie inside
  the file (a truncated download fails with one line instead of a deep stack trace).
* ``.bin``: unpickled first with ``torch.load(weights_only=True)``, which refuses any pickle that would run code
  (e.g. a ``__reduce__`` calling ``exec``); only then does transformers load it (also weights-only).
"""
from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolora_probe.model.source import (ModelConfigError, ModelSource, RemoteCodeRefused, hub_usable, load_config,
                           resolve_model_source)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX)
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1}


class ModelLoadError(RuntimeError):
    """The model's weights could not be loaded; the message is one actionable line."""


@dataclass(frozen=True)
class SafetensorsInfo:
    path: Path
    tensors: int
    header_bytes: int
    data_bytes: int       # bytes the header's tensors need
    file_bytes: int


@dataclass(frozen=True)
class LoadedModel:
    model: Any                        # a transformers PreTrainedModel in eval mode, on CPU
    source: ModelSource
    config: Any
    weight_format: str                # "safetensors" | "bin-weights-only"
    weight_files: tuple[Path, ...]
    load_seconds: float
    total_params: int                 # shared parameters counted once
    trainable_params: int
    tied: tuple[tuple[str, ...], ...]  # groups of parameter names that share one tensor
    tie_expected: bool                # the config asks for tied input/output embeddings
    missing_keys: tuple[str, ...] = field(default_factory=tuple)
    unexpected_keys: tuple[str, ...] = field(default_factory=tuple)
    mismatched_keys: tuple[str, ...] = field(default_factory=tuple)

    @property
    def head_tied(self) -> bool:
        """True when the output embedding (lm_head) is the very tensor of the input embedding."""
        out = self.model.get_output_embeddings()
        inp = self.model.get_input_embeddings()
        return out is not None and inp is not None and out.weight is inp.weight


def fetch_file(source: ModelSource, filename: str) -> Path | None:
    """``filename`` of the model: from its directory, else (cache/hub sources, online) downloaded; None if absent."""
    p = source.path / filename
    if p.is_file():
        return p
    if source.kind == "local" or not hub_usable():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source.model_id, filename, revision=source.revision))
    except Exception as exc:  # noqa: BLE001 - absent on the hub is the same answer as absent locally
        from kolora_probe.model.source import is_network_error, mark_hub_unreachable

        if is_network_error(exc):
            mark_hub_unreachable(exc)
        return None


def check_safetensors(path: Path) -> SafetensorsInfo:
    """Parse a safetensors header and check each tensor's byte range against its dtype/shape and the file size."""
    size = path.stat().st_size
    fix = f"the file {path} is incomplete or corrupt; fix: re-download it or re-save it with save_pretrained()"
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path.name} is truncated: {size} bytes, too short for a safetensors header; {fix}")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ModelLoadError(f"{path.name} is truncated: header says {n} header bytes but the file has {size} "
                                 f"bytes; {fix}")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path.name}: unreadable safetensors header ({exc}); {fix}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name}: malformed safetensors header (a JSON {type(header).__name__}, not an "
                             f"object of tensors); {fix}")
    end = 0
    tensors = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        entry = f"{path.name}: malformed safetensors header entry {name[:80]!r}"
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{entry} (a JSON {type(meta).__name__}, not an object); {fix}")
        offsets, shape, dtype = meta.get("data_offsets"), meta.get("shape"), meta.get("dtype")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)):
            raise ModelLoadError(f"{entry} (data_offsets {str(offsets)[:60]} is not two integers >= 0); {fix}")
        if not (isinstance(shape, list) and all(_is_count(x) for x in shape)):
            raise ModelLoadError(f"{entry} (shape {str(shape)[:60]} is not a list of integers >= 0); {fix}")
        if not isinstance(dtype, str):
            raise ModelLoadError(f"{entry} (dtype {str(dtype)[:60]} is not a string); {fix}")
        start, stop = offsets
        numel = 1
        for d in shape:
            numel *= d
        want = numel * _DTYPE_BYTES[dtype] if dtype in _DTYPE_BYTES else stop - start
        if stop - start != want or stop < start:
            raise ModelLoadError(f"{path.name}: tensor {name[:80]} occupies {stop - start} bytes but dtype {dtype} "
                                 f"× shape {shape} needs {want}; {fix}")
        end = max(end, stop)
        tensors += 1
    if 8 + n + end > size:
        raise ModelLoadError(f"{path.name} is truncated: its {tensors} tensors need {8 + n + end} bytes but the file "
                             f"has {size}; {fix}")
    return SafetensorsInfo(path, tensors, n, end, size)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _shards(index: Path) -> list[str]:
    """The shard file names an index's ``weight_map`` lists: plain names of files beside the index. A shard
    outside the model directory (``../other/model.safetensors``, an absolute path) is refused: it would load
    another model's weights."""
    from pathlib import PurePosixPath, PureWindowsPath

    fix = "fix: re-download or re-save the model"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{index}: unreadable shard index ({str(exc)[:200]}); {fix}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: malformed shard index (no weight_map object of tensor → file); {fix}")
    shards = set()
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ModelLoadError(f"{index}: malformed shard index (weight_map[{tensor[:80]!r}] is "
                                 f"{str(shard)[:60]}, not a file name); {fix}")
        shards.add(shard)
    for shard in shards:
        posix, win = PurePosixPath(shard), PureWindowsPath(shard)
        if posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts or ".." in win.parts:
            raise ModelLoadError(f"{index} lists shard {shard[:200]!r}, outside the model directory {index.parent}: "
                                 f"refused (it would load another model's weights); {fix} so that every shard is a "
                                 f"file inside the model directory")
    return sorted(shards)


def verify_bin_weights_only(path: Path) -> None:
    """Unpickle ``path`` with ``torch.load(weights_only=True)``: tensors only; a pickle that runs code is refused."""
    import pickle
    import zipfile

    import torch

    try:
        torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError) as exc:
        reason = refusal_reason(exc)
        raise ModelLoadError(
            f"{path.name} refused: it is not a plain weights pickle (torch.load weights_only=True: {reason}); "
            f"kolora-probe never unpickles arbitrary objects; fix: use a model.safetensors copy of this model") from None


# PyTorch's weights-only refusal also advises re-running with weights_only=False: that advice is never repeated
_UNSAFE_ADVICE = ("weights_only", "trust", "two options", "Alternatively", "documentation", "add_safe_globals")


def refusal_reason(exc: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, in a few words: the global the pickle would have called
    (``posix.system``, ``exec``) or the unpickler's own error, never PyTorch's advice to load unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    m = (re.search(r"unsupported GLOBAL ([\w.]+) whose module ([\w.]+) is blocked", text)
         or re.search(r"Unsupported global: GLOBAL ([\w.]+)", text))
    if m:
        return f"unsupported global {m.group(1)}" + (f" (module {m.group(2)} is blocked)" if m.lastindex == 2 else "")
    m = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. Please|\.?$)", text, re.M)
    if m and not any(w in m.group(1) for w in _UNSAFE_ADVICE):
        return m.group(1)[:160]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not any(w in ln for w in _UNSAFE_ADVICE)]
    return (lines[0][:160] if lines else type(exc).__name__)


def find_weights(source: ModelSource) -> tuple[str, tuple[Path, ...]]:
    """(format, files) of the model's weights, safetensors preferred; raises ModelLoadError when there are none."""
    for index_name, single, fmt in ((SAFETENSORS_INDEX, SAFETENSORS, "safetensors"),
                                    (BIN_INDEX, BIN, "bin-weights-only")):
        single_path = fetch_file(source, single)
        if single_path is not None:
            return fmt, (single_path,)
        index_path = fetch_file(source, index_name)
        if index_path is not None:
            files = []
            for shard in _shards(index_path):
                sp = fetch_file(source, shard)
                if sp is None:
                    raise ModelLoadError(f"{index_path} lists shard {shard}, which is missing; re-download the model")
                files.append(sp)
            return fmt, tuple(files)
    present = ", ".join(source.files) or "nothing"
    raise ModelLoadError(
        f"no model weights in {source.path} (has {present}; expected {SAFETENSORS} or {BIN}); point --model "
        f"(or [model].id) at a directory written by save_pretrained() with its weights")


def tied_groups(model) -> tuple[tuple[str, ...], ...]:
    """Names of parameters sharing one tensor (e.g. ``lm_head.weight`` and ``transformer.wte.weight``), sorted."""
    from kolora_probe.model.structure import parameter_tensors

    return tuple(tuple(sorted(g.names)) for g in parameter_tensors(model) if len(g.names) > 1)


def load_model(model_id: str, revision: str = "main", dtype: str = "fp32") -> LoadedModel:
    """Resolve, verify and load ``model_id`` as a causal LM on CPU. Raises ModelNotFound / ModelLoadError."""
    return load_model_from(resolve_model_source(model_id, revision), dtype)


def load_model_from(source: ModelSource, dtype: str = "fp32") -> LoadedModel:
    """Verify and load the already resolved ``source`` as a causal LM on CPU. Raises ModelLoadError."""
    from transformers import AutoModelForCausalLM

    from kolora_probe.model.meta import count_parameters, require_causal_lm, torch_dtype
    from kolora_probe.model.structure import ties_word_embeddings

    try:
        config = load_config(source)
    except (RemoteCodeRefused, ModelConfigError) as exc:
        raise ModelLoadError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{source.path / 'config.json'}: unreadable config ({str(exc).splitlines()[0][:200]}); "
                             f"re-save the model with save_pretrained()") from None
    try:
        require_causal_lm(config)
    except ModelConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    fmt, files = find_weights(source)
    for f in files:
        if fmt == "safetensors":
            check_safetensors(f)
        else:
            verify_bin_weights_only(f)
    t0 = time.perf_counter()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(source.path), config=config, trust_remote_code=False, use_safetensors=(fmt == "safetensors"),
            dtype=torch_dtype(dtype), output_loading_info=True, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - reported as one line, never hidden
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(f"loading {files[0].name} from {source.path} failed: {type(exc).__name__}: "
                             f"{msg[:240]}; fix: re-download or re-save the model") from None
    seconds = time.perf_counter() - t0
    model.eval()
    total, trainable = count_parameters(model)
    return LoadedModel(
        model=model, source=source, config=config, weight_format=fmt, weight_files=files, load_seconds=seconds,
        total_params=total, trainable_params=trainable, tied=tied_groups(model),
        tie_expected=ties_word_embeddings(config),
        missing_keys=tuple(sorted(info.get("missing_keys", ()))),
        unexpected_keys=tuple(sorted(info.get("unexpected_keys", ()))),
        mismatched_keys=tuple(sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                                     for k in info.get("mismatched_keys", ()))))
