"""Model configs for the structure / LoRA-count tests, built locally (no hub): full-size KoGPT-2 and small
LLaMA-style, GPT-NeoX and OPT configs. Dimensions are module constants so tests can hand-derive counts."""
from __future__ import annotations

from pathlib import Path

# skt/kogpt2-base-v2
KO_VOCAB, KO_POS, KO_D, KO_LAYERS, KO_HEADS = 51200, 1024, 768, 12, 12
# small LLaMA-style (grouped-query attention: 2 KV heads of 16)
LL_VOCAB, LL_D, LL_FF, LL_LAYERS, LL_HEADS, LL_KV = 100, 64, 128, 2, 4, 2
# small GPT-NeoX
NX_VOCAB, NX_D, NX_FF, NX_LAYERS, NX_HEADS = 100, 64, 256, 2, 4
# small OPT (tied head, learned positions with OPT's offset of 2)
OPT_VOCAB, OPT_D, OPT_FF, OPT_LAYERS, OPT_HEADS, OPT_POS = 100, 64, 128, 2, 4, 32


def kogpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=KO_VOCAB, n_positions=KO_POS, n_embd=KO_D, n_layer=KO_LAYERS, n_head=KO_HEADS,
                      activation_function="gelu_new", bos_token_id=0, eos_token_id=1, pad_token_id=3,
                      architectures=["GPT2LMHeadModel"])


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=LL_VOCAB, hidden_size=LL_D, intermediate_size=LL_FF, num_hidden_layers=LL_LAYERS,
                       num_attention_heads=LL_HEADS, num_key_value_heads=LL_KV, max_position_embeddings=64,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def neox_config():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=NX_VOCAB, hidden_size=NX_D, intermediate_size=NX_FF,
                         num_hidden_layers=NX_LAYERS, num_attention_heads=NX_HEADS, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


def opt_config():
    from transformers import OPTConfig

    return OPTConfig(vocab_size=OPT_VOCAB, hidden_size=OPT_D, ffn_dim=OPT_FF, num_hidden_layers=OPT_LAYERS,
                     num_attention_heads=OPT_HEADS, max_position_embeddings=OPT_POS, word_embed_proj_dim=OPT_D,
                     bos_token_id=2, eos_token_id=2, pad_token_id=1)


def save_config(config, directory: Path) -> Path:
    """A model directory holding only config.json (what `--model DIR` gets in the config-only tests)."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json"]
    return directory
