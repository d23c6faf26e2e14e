"""Local stand-ins for KoGPT-2 (no hub here): built once, deterministic, cached on disk.

:func:`model_zoo` returns a :class:`ModelZoo` of directories:

* ``full_config`` – ``config.json`` only, exactly ``skt/kogpt2-base-v2``'s architecture (for meta-device counts).
* ``tiny`` – a tiny KoGPT-2-shaped ``GPT2LMHeadModel`` (n_embd 64, 2 layers, tied head) saved with
  ``save_pretrained`` (``model.safetensors``) and a ``tokenizer.json`` trained with ``tokenizers`` on the
  packaged Korean sample: character BPE with ``▁`` word markers (Metaspace), KoGPT-2's special-token ids
  (``<s>`` 0, ``</s>`` 1, ``<usr>`` 2, ``<pad>`` 3, ``<sys>`` 4, ``<unk>`` 5, ``<mask>`` 6), no
  ``tokenizer_config.json`` (like the hub repo). The model is briefly trained on the sample so its LM loss is
  far below ln(vocab).
* broken variants: ``shuffled`` (same tensors, values permuted), ``byte_level`` (tiny weights with a byte-level
  GPT-2-style BPE tokenizer.json of the same size: ids no longer mean what the model learnt), ``truncated``
  (``model.safetensors`` cut short), ``config_only`` (tiny ``config.json`` only), ``no_tokenizer`` (weights,
  no tokenizer files), ``pickle_bin`` (``pytorch_model.bin`` whose pickle would write ``pickle_marker`` when
  unpickled unsafely), ``remote_code`` (config with ``auto_map`` and a custom ``model_type``; its Python file
  would write ``remote_code_marker`` if it ever ran).

The zoo is built into a fresh directory and renamed into place, so concurrent builders never see a half-built
zoo; the cache key covers this file and the Korean sample, so editing either rebuilds it. Usable from tests
(session fixture ``model_zoo`` in tests/conftest.py) and from benchmarks (``python tests/model_factory.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "kolora_probe" / "data" / "korean_sample.txt"

KOGPT2_SPECIALS = ("<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>")  # ids 0..6 as in KoGPT-2
KOGPT2_SPECIAL_TOKENS = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                         "mask_token": "<mask>"}
KOGPT2_CONFIG = {
    "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 51200, "n_positions": 1024,
    "n_ctx": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 1,
    "pad_token_id": 3, "tie_word_embeddings": True, "use_cache": True,
}
KOGPT2_TOTAL_PARAMS = 125_164_032
TINY = {"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 128}
SEED = 1234
TRAIN_STEPS = 150
BATCH = 32


@dataclass(frozen=True)
class ModelZoo:
    root: Path
    full_config: Path
    tiny: Path
    shuffled: Path
    byte_level: Path
    truncated: Path
    config_only: Path
    no_tokenizer: Path
    pickle_bin: Path
    remote_code: Path
    pickle_marker: Path       # appears only if the malicious pickle was executed
    remote_code_marker: Path  # appears only if the remote-code module was imported
    vocab_size: int
    train_loss: float         # mean LM loss of ``tiny`` on the sample after training
    build_seconds: float


def _cache_key() -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(SAMPLE.read_bytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    base = os.environ.get("KOLORA_ZOO_DIR")
    return Path(base) if base else Path(tempfile.gettempdir()) / f"kolora-probe-zoo-{_cache_key()}"


def model_zoo(cache_dir: Path | None = None) -> ModelZoo:
    """The zoo under ``cache_dir`` (default: a temp dir keyed on this file and the sample), built if missing."""
    target = Path(cache_dir) if cache_dir else default_cache_dir()
    meta = target / "zoo.json"
    if not meta.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=target.name + ".build-", dir=target.parent))
        try:
            _build(work, final=target)
            try:
                work.rename(target)
            except OSError:  # another process finished first: use theirs
                if not meta.is_file():
                    raise
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    info = json.loads(meta.read_text(encoding="utf-8"))
    return _zoo(target, info)


def _zoo(root: Path, info: dict) -> ModelZoo:
    return ModelZoo(
        root=root, full_config=root / "full_config", tiny=root / "tiny", shuffled=root / "shuffled",
        byte_level=root / "byte_level", truncated=root / "truncated", config_only=root / "config_only",
        no_tokenizer=root / "no_tokenizer", pickle_bin=root / "pickle_bin", remote_code=root / "remote_code",
        pickle_marker=root / "PICKLE_EXECUTED", remote_code_marker=root / "REMOTE_CODE_EXECUTED",
        vocab_size=info["vocab_size"], train_loss=info["train_loss"], build_seconds=info["build_seconds"])


# --- building ---------------------------------------------------------------------------------------
def sample_lines() -> list[str]:
    return [ln.strip() for ln in SAMPLE.read_text(encoding="utf-8").splitlines() if ln.strip()]


def train_kogpt2_like_tokenizer(lines: list[str], vocab_size: int = 1600):
    """Character-level BPE with ``▁`` word markers (Metaspace), KoGPT-2's special tokens at ids 0..6."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(KOGPT2_SPECIALS), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def train_byte_level_tokenizer(lines: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE (Ġ-style bytes) with the same special tokens and vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(KOGPT2_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def _tiny_config(vocab_size: int):
    from transformers import GPT2Config

    cfg = {**KOGPT2_CONFIG, **TINY, "n_ctx": TINY["n_positions"], "vocab_size": vocab_size,
           "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    cfg.pop("architectures")
    cfg.pop("model_type")
    return GPT2Config(architectures=["GPT2LMHeadModel"], **cfg)


def _batches(tok, lines: list[str], pad_id: int):
    import torch

    ids = [tok.encode(line).ids[: TINY["n_positions"]] for line in lines]
    width = max(len(x) for x in ids)
    inp = torch.full((len(ids), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, : len(x)] = torch.tensor(x)
        att[i, : len(x)] = 1
    labels = inp.masked_fill(att == 0, -100)
    return inp, att, labels


def _train(model, tok, lines: list[str], steps: int) -> float:
    import torch

    inp, att, labels = _batches(tok, lines, pad_id=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(inp.shape[0], generator=gen)[:BATCH]
        loss = model(input_ids=inp[idx], attention_mask=att[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=inp, attention_mask=att, labels=labels).loss)


class _WritesMarker:
    """Unpickling this calls ``exec`` — what a malicious ``pytorch_model.bin`` does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pickle executed')",))


def _build(root: Path, final: Path) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        lines = sample_lines()
        # full-size KoGPT-2 config, config.json only
        (root / "full_config").mkdir()
        (root / "full_config" / "config.json").write_text(json.dumps(KOGPT2_CONFIG, indent=2), encoding="utf-8")

        tok = train_kogpt2_like_tokenizer(lines)
        vocab = tok.get_vocab_size()
        for i, s in enumerate(KOGPT2_SPECIALS):
            assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
        config = _tiny_config(vocab)
        model = GPT2LMHeadModel(config)
        train_loss = _train(model, tok, lines, TRAIN_STEPS)

        tiny = root / "tiny"
        model.save_pretrained(tiny)  # config.json + model.safetensors (tied head stored once)
        tok.save(str(tiny / "tokenizer.json"))
        for f in ("generation_config.json",):
            (tiny / f).unlink(missing_ok=True)

        # shuffled weights: same tensors and shapes, values permuted
        shuffled = root / "shuffled"
        bad = GPT2LMHeadModel(config)
        gen = torch.Generator().manual_seed(SEED + 1)
        with torch.no_grad():
            for (name, p), (_, q) in zip(bad.named_parameters(), model.named_parameters()):
                flat = q.detach().reshape(-1)
                p.copy_(flat[torch.randperm(flat.numel(), generator=gen)].reshape(q.shape))
        bad.save_pretrained(shuffled)
        shutil.copy(tiny / "tokenizer.json", shuffled / "tokenizer.json")

        # byte-level tokenizer with the tiny weights
        byte_level = root / "byte_level"
        shutil.copytree(tiny, byte_level)
        train_byte_level_tokenizer(lines, vocab).save(str(byte_level / "tokenizer.json"))

        # truncated safetensors
        truncated = root / "truncated"
        shutil.copytree(tiny, truncated)
        st = truncated / "model.safetensors"
        data = st.read_bytes()
        st.write_bytes(data[: int(len(data) * 0.6)])

        # config only (tiny config)
        (root / "config_only").mkdir()
        shutil.copy(tiny / "config.json", root / "config_only" / "config.json")

        # weights, no tokenizer files
        shutil.copytree(tiny, root / "no_tokenizer")
        (root / "no_tokenizer" / "tokenizer.json").unlink()

        # pickle that executes code when unpickled unsafely
        pb = root / "pickle_bin"
        pb.mkdir()
        shutil.copy(tiny / "config.json", pb / "config.json")
        shutil.copy(tiny / "tokenizer.json", pb / "tokenizer.json")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["transformer.wte.weight"] = _WritesMarker(final / "PICKLE_EXECUTED")
        torch.save(state, pb / "pytorch_model.bin")

        # remote code required
        rc = root / "remote_code"
        shutil.copytree(tiny, rc)
        cfg = json.loads((rc / "config.json").read_text(encoding="utf-8"))
        cfg.update(model_type="kolora-custom-gpt", architectures=["CustomGPTForCausalLM"],
                   auto_map={"AutoConfig": "configuration_custom.CustomGPTConfig",
                             "AutoModelForCausalLM": "modeling_custom.CustomGPTForCausalLM"})
        (rc / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        code = "open(__file__.rsplit('/', 2)[0] + '/REMOTE_CODE_EXECUTED', 'w').write('remote code ran')\n"
        (rc / "configuration_custom.py").write_text(code, encoding="utf-8")
        (rc / "modeling_custom.py").write_text(code, encoding="utf-8")

        info = {"vocab_size": vocab, "train_loss": train_loss, "build_seconds": round(time.perf_counter() - t0, 2)}
        (root / "zoo.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    z = model_zoo()
    print(json.dumps({k: str(v) for k, v in z.__dict__.items()}, indent=2))
