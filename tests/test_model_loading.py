"""model_loading on the tiny KoGPT-2-shaped zoo: safetensors checks, weights-only .bin, no remote code, ties;
and the real suite (checks/test_model.py + test_tokenizer.py) run in a subprocess on good and broken models."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from kolora_probe.model.meta import build_meta_model, count_parameters
from kolora_probe.model.loading import (ModelLoadError, check_safetensors, find_weights, load_model, tied_groups,
                                        verify_bin_weights_only)
from kolora_probe.model.source import ModelNotFound, load_config, resolve_model_source
from model_factory import KOGPT2_TOTAL_PARAMS, _WritesMarker
from suite_runner import gate_run, run_suite

SUITE = ("checks/test_model.py", "checks/test_tokenizer.py")


@pytest.fixture(scope="module")
def tiny(model_zoo):
    return load_model(str(model_zoo.tiny))


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    return msg


# --- the factory -------------------------------------------------------------------------------------
def test_zoo_layout_mirrors_the_hub_repo(model_zoo):
    files = {p.name for p in model_zoo.tiny.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert "tokenizer_config.json" not in files  # like skt/kogpt2-base-v2
    cfg = json.loads((model_zoo.tiny / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 1, 3)
    assert cfg["vocab_size"] == model_zoo.vocab_size and cfg["tie_word_embeddings"] is True
    assert [p.name for p in model_zoo.full_config.iterdir()] == ["config.json"]
    assert not (model_zoo.config_only / "model.safetensors").exists()


def test_full_size_config_is_kogpt2(model_zoo):
    config = load_config(resolve_model_source(str(model_zoo.full_config)))
    total, _ = count_parameters(build_meta_model(config))
    assert total == KOGPT2_TOTAL_PARAMS == 125_164_032


# --- loading the good model ---------------------------------------------------------------------------
def test_tiny_loads_from_safetensors_with_tie(tiny, model_zoo):
    assert tiny.weight_format == "safetensors"
    assert [f.name for f in tiny.weight_files] == ["model.safetensors"]
    assert tiny.source.kind == "local" and tiny.source.path == model_zoo.tiny.resolve()
    assert tiny.tie_expected and tiny.head_tied
    assert ("lm_head.weight", "transformer.wte.weight") in tiny.tied
    assert not tiny.missing_keys and not tiny.mismatched_keys
    assert type(tiny.model).__name__ == "GPT2LMHeadModel" and not tiny.model.training


def test_param_count_counts_the_tie_once(tiny):
    config = tiny.config
    v, d, n_pos, layers = config.vocab_size, config.n_embd, config.n_positions, config.n_layer
    per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = v * d + n_pos * d + layers * per_layer + 2 * d  # wte (shared with lm_head), wpe, blocks, ln_f
    assert tiny.total_params == expected == tiny.trainable_params
    assert tiny.total_params == count_parameters(build_meta_model(config))[0]


def test_tied_groups_sees_a_broken_tie(tiny):
    import copy

    m = copy.deepcopy(tiny.model)
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
    assert tied_groups(m) == ()
    assert count_parameters(m)[0] == tiny.total_params + m.lm_head.weight.numel()


# --- safetensors checks ---------------------------------------------------------------------------------
def test_check_safetensors_accounts_for_every_byte(model_zoo):
    info = check_safetensors(model_zoo.tiny / "model.safetensors")
    assert info.file_bytes == 8 + info.header_bytes + info.data_bytes
    assert info.tensors == 2 + 2 * 12 + 2  # wte, wpe, 12 per block, ln_f w+b (lm_head tied: not stored)


def test_truncated_safetensors_is_one_line(model_zoo):
    with pytest.raises(ModelLoadError) as ei:
        load_model(str(model_zoo.truncated))
    msg = _one_line(ei.value)
    assert "model.safetensors is truncated" in msg and "re-download" in msg
    good = (model_zoo.tiny / "model.safetensors").stat().st_size
    assert f"need {good} bytes" in msg


def test_safetensors_header_lying_about_a_tensor_size(tmp_path, model_zoo):
    src = (model_zoo.tiny / "model.safetensors").read_bytes()
    n = int.from_bytes(src[:8], "little")
    header = json.loads(src[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
    new = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(new).to_bytes(8, "little") + new + src[8 + n:])
    with pytest.raises(ModelLoadError, match=f"tensor {name} occupies"):
        check_safetensors(tmp_path / "model.safetensors")


def test_safetensors_is_preferred_over_bin(tmp_path, model_zoo):
    d = tmp_path / "both"
    shutil.copytree(model_zoo.tiny, d)
    marker = tmp_path / "EXECUTED"
    torch.save({"x": _WritesMarker(marker)}, d / "pytorch_model.bin")
    loaded = load_model(str(d))
    assert loaded.weight_format == "safetensors" and not marker.exists()


# --- .bin only through weights-only unpickling ---------------------------------------------------------
def test_plain_bin_loads_weights_only(tmp_path, tiny, model_zoo):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(model_zoo.tiny / "config.json", d)
    torch.save(tiny.model.state_dict(), d / "pytorch_model.bin")
    loaded = load_model(str(d))
    assert loaded.weight_format == "bin-weights-only" and loaded.head_tied
    for (n1, p1), (n2, p2) in zip(loaded.model.state_dict().items(), tiny.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_malicious_pickle_is_refused_never_executed(tmp_path, model_zoo):
    marker = tmp_path / "EXECUTED"
    evil = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "x": _WritesMarker(marker)}, evil)
    with pytest.raises(ModelLoadError, match="refused.*weights_only=True.*exec"):
        verify_bin_weights_only(evil)
    assert not marker.exists()
    # the same file really runs code when unpickled unsafely (so the check above can fail)
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "pickle executed"
    # the zoo's variant, through the full loader
    with pytest.raises(ModelLoadError) as ei:
        load_model(str(model_zoo.pickle_bin))
    assert "pytorch_model.bin refused" in _one_line(ei.value) and "safetensors" in str(ei.value)
    assert not model_zoo.pickle_marker.exists()


# --- other refusals ------------------------------------------------------------------------------------
def test_config_only_dir_has_no_weights(model_zoo):
    with pytest.raises(ModelLoadError) as ei:
        find_weights(resolve_model_source(str(model_zoo.config_only)))
    msg = _one_line(ei.value)
    assert msg.startswith(f"no model weights in {model_zoo.config_only}") and "has config.json" in msg
    assert "save_pretrained" in msg


def test_remote_code_is_refused_never_imported(model_zoo):
    with pytest.raises(ModelLoadError) as ei:
        load_model(str(model_zoo.remote_code))
    assert "trust_remote_code" in _one_line(ei.value)
    assert not model_zoo.remote_code_marker.exists()


def test_missing_config_json_is_one_line(tmp_path, model_zoo):
    d = tmp_path / "noconfig"
    shutil.copytree(model_zoo.tiny, d)
    (d / "config.json").unlink()
    with pytest.raises(ModelNotFound) as ei:
        load_model(str(d))
    assert "has no config.json" in _one_line(ei.value)


def test_unknown_model_offline_is_not_substituted(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotFound) as ei:
        load_model("nobody/no-such-kogpt2")
    assert "'nobody/no-such-kogpt2'" in _one_line(ei.value) and "--model DIR" in str(ei.value)


# --- the real suite, in a subprocess ----------------------------------------------------------------------
def test_suite_passes_on_the_tiny_model(tmp_path, model_zoo):
    run = gate_run(model_zoo.tiny)                  # the whole gate, shared with test_faults' clean baseline
    assert run.returncode == 0, run.output[-3000:]
    outcomes = {k: v for k, v in run.outcomes().items() if k.startswith(SUITE)}
    assert len(outcomes) == 17 and set(outcomes.values()) == {"passed"}
    loss = {e["name"]: e for e in run.outcome("test_tokenizer_model_agreement")["evidence"]}
    assert loss["loss"]["actual"] < 0.6 * loss["ln_vocab"]["actual"]
    fmt = {e["name"]: e["actual"] for e in run.outcome("test_weights_format_is_safe")["evidence"]}
    assert fmt["weight_format"] == "safetensors"


@pytest.mark.parametrize("variant, reason", [
    ("truncated", "model weights could not be loaded: model.safetensors is truncated"),
    ("config_only", "model weights could not be loaded: no model weights in"),
    ("pickle_bin", "model weights could not be loaded: pytorch_model.bin refused"),
    ("remote_code", "model weights could not be loaded:"),
])
def test_suite_fails_weight_checks_on_broken_weights(tmp_path, model_zoo, variant, reason):
    run = run_suite(*SUITE, f"--model={getattr(model_zoo, variant)}", reports=tmp_path / "r")
    assert run.returncode == 1, run.output[-3000:]
    for check in ("test_weights_load", "test_tied_head_preserved", "test_greedy_generation",
                  "test_tokenizer_model_agreement"):
        entry = run.outcome(check)
        assert entry["outcome"] == "failed", entry
        if check == "test_weights_load":  # the owner has the full reason, the others point at it
            assert entry["message"].startswith(reason) and "\n" not in entry["message"], entry["message"]
        else:
            assert entry["message"] == "blocked: model weights could not be loaded — see test_weights_load", entry
    assert run.outcome("test_model_found")["outcome"] == "passed"
    assert not model_zoo.pickle_marker.exists() and not model_zoo.remote_code_marker.exists()
    if variant == "remote_code":
        assert "trust_remote_code" in run.outcome("test_weights_load")["message"]


def test_sharded_safetensors_each_shard_checked(tmp_path, tiny, model_zoo):
    d = tmp_path / "sharded"
    tiny.model.save_pretrained(d, max_shard_size="300KB")
    shutil.copy(model_zoo.tiny / "tokenizer.json", d)
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (d / "model.safetensors.index.json").is_file()
    loaded = load_model(str(d))
    assert [f.name for f in loaded.weight_files] == shards and loaded.head_tied
    last = d / shards[-1]
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=f"{shards[-1]} is truncated"):
        load_model(str(d))
