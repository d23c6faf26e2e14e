"""Published, measured peak memory of LoRA/QLoRA runs, reproduced from config only (no GPU, no weights).

Each row is a measured ``torch.cuda.max_memory_allocated`` peak from a public benchmark table; the model config is
written from the published architecture and the step from the published settings. kolora-probe's trace runs with
the plan's default stack for that row (``StepShape.from_plan`` defaults: prepare_model_for_kbit_training and
reentrant checkpointing for 4-bit) and, where the row's trainer does more, with that too (TRL's bf16 casting).

usage: python benchmarks/published_peaks.py [--out benchmarks/results/published-peaks.json] [--only SUBSTRING]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FMS = ("foundation-model-stack/fms-acceleration scripts/benchmarks/refs/a100_80gb.csv "
       "(HF Trainer + TRL SFT, A100-80GB, bf16, packed seq 4096, gradient checkpointing, adamw_torch, FA2)")


def mistral_7b():
    from transformers import MistralConfig

    # mistralai/Mistral-7B-v0.1 config.json
    return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
QLORA = dict(dtype="bf16", weights_dtype="bf16", quantization="4bit", double_quant=True, seq_len=4096,
             gradient_checkpointing=True, optimizer="adamw", targets=ATTN, r=16, alpha=16.0, lora_dropout=0.1,
             attn_implementation="flash_attention_2")
# The plan's defaults for a 4-bit plan (what StepShape.from_plan resolves): PEFT's prepare_model_for_kbit_training,
# reentrant checkpointing (PEFT passes no use_reentrant; torch defaults to True).
QLORA_DEFAULT = dict(QLORA, prepare_kbit=True, checkpointing_reentrant=True)
LORA = dict(dtype="bf16", weights_dtype="bf16", seq_len=4096, gradient_checkpointing=True, optimizer="adamw",
            targets=ATTN, r=16, alpha=16.0, lora_dropout=0.1, attn_implementation="flash_attention_2",
            checkpointing_reentrant=True)

# name: (config factory, StepShape kwargs, published bytes, source, settings); NVIDIA: the same rows'
# mem_nvidia_mem_reserved (MiB, device memory in use as nvidia-smi reports it: context + everything reserved)
NVIDIA_MIB = {"QLoRA b8": 46050, "QLoRA b4": 26056, "LoRA b8": 43232, "LoRA b4": 29576}
ROWS = {
    "Mistral-7B QLoRA b8 (plan defaults)": (mistral_7b, dict(QLORA_DEFAULT, batch_size=8), 37_002_646_016, FMS,
                                            "baseline-peft-bnb, NF4 double quant, LoRA r16 a16 q,k,v,o, batch 8"),
    "Mistral-7B QLoRA b8 (+ TRL casting)": (mistral_7b, dict(QLORA_DEFAULT, batch_size=8, trl_casting=True),
                                            37_002_646_016, FMS, "as above; trl_casting = true"),
    "Mistral-7B QLoRA b8 (no prepare_kbit: before)": (mistral_7b, dict(QLORA, batch_size=8), 37_002_646_016, FMS,
                                                      "as above; prepare_kbit = false (kolora-probe before)"),
    "Mistral-7B QLoRA b4 (plan defaults)": (mistral_7b, dict(QLORA_DEFAULT, batch_size=4), 20_669_338_112, FMS,
                                            "baseline-peft-bnb, NF4 double quant, LoRA r16 a16 q,k,v,o, batch 4"),
    "Mistral-7B QLoRA b4 (+ TRL casting)": (mistral_7b, dict(QLORA_DEFAULT, batch_size=4, trl_casting=True),
                                            20_669_338_112, FMS, "as above; trl_casting = true"),
    "Mistral-7B LoRA b8": (mistral_7b, dict(LORA, batch_size=8), 38_742_912_512, FMS,
                           "framework none, bf16 weights, LoRA r16 a16 q,k,v,o, batch 8"),
    "Mistral-7B LoRA b4": (mistral_7b, dict(LORA, batch_size=4), 26_704_571_904, FMS,
                           "framework none, bf16 weights, LoRA r16 a16 q,k,v,o, batch 4"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "published-peaks.json"))
    ap.add_argument("--only", default="", help="run only rows whose name contains this")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from kolora_probe.memory.trace import StepShape, trace_step

    results = []
    for name, (factory, kw, published, source, settings) in ROWS.items():
        if args.only and args.only not in name:
            continue
        t0 = time.perf_counter()
        e = trace_step(factory(), StepShape(**kw))
        from kolora_probe.memory.budget import cuda_context_bytes

        err = 100.0 * (e.predicted_peak_bytes - published) / published
        card = e.predicted_peak_bytes + e.allocator_overhead_bytes + cuda_context_bytes("2.4.1", "")
        nvidia = next((v * 2 ** 20 for k, v in NVIDIA_MIB.items() if k in name and not
                       (k.startswith("LoRA") and "QLoRA" in name)), None)
        results.append({"row": name, "published_bytes": published, "predicted_bytes": e.predicted_peak_bytes,
                        "error_percent": round(err, 2), "allocator_overhead_bytes": e.allocator_overhead_bytes,
                        "card_required_bytes": card, "published_nvidia_bytes": nvidia,
                        "card_error_percent": round(100.0 * (card - nvidia) / nvidia, 2) if nvidia else None,
                        "peak_op": e.peak_op, "trace_s": round(time.perf_counter() - t0, 1), "source": source,
                        "settings": settings, "shape": e.shape.describe()})
        print(f"{name}: published {published / 1e9:.2f} GB, predicted {e.predicted_peak_bytes / 1e9:.2f} GB "
              f"({err:+.1f} %); card {card / 2**20:,.0f} MiB vs nvidia-smi {nvidia / 2**20 if nvidia else 0:,.0f} MiB; "
              f"{results[-1]['trace_s']} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
