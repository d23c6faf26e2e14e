"""Per-rank peak grid for the README: full-size KoGPT-2 and a 7B LLaMA-style config, LoRA and QLoRA, 1/2/4/8
ranks, each strategy, beside DeepSpeed's own ZeRO estimators (model states of the whole model, all parameters
trainable: what `estimate_zero2/3_model_states_mem_needs_all_cold` report).

    python benchmarks/distributed_grid.py [--only kogpt2] [--fsdp-method trace|closed_form]

Writes benchmarks/results/distributed_grid.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
GIB = 2 ** 30
RANKS = (1, 2, 4, 8)


def configs():
    from structure_configs import kogpt2_config
    from transformers import LlamaConfig

    from kolora_probe.memory.trace import StepShape

    llama7b = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                          tie_word_embeddings=False)
    ko = ("c_attn", "c_proj", "c_fc")
    ll = ("q_proj", "k_proj", "v_proj", "o_proj")
    return [
        ("kogpt2", "LoRA fp32 b8 s512", kogpt2_config(), StepShape(8, 512, targets=ko)),
        ("kogpt2", "QLoRA bf16 b8 s512 ckpt", kogpt2_config(),
         StepShape(8, 512, dtype="bf16", weights_dtype="bf16", quantization="4bit", gradient_checkpointing=True,
                   targets=ko)),
        ("llama-7b", "LoRA bf16 b1 s2048 ckpt", llama7b,
         StepShape(1, 2048, dtype="bf16", weights_dtype="bf16", gradient_checkpointing=True, targets=ll)),
        ("llama-7b", "QLoRA bf16 b1 s2048 ckpt", llama7b,
         StepShape(1, 2048, dtype="bf16", weights_dtype="bf16", quantization="4bit", gradient_checkpointing=True,
                   targets=ll)),
    ]


def deepspeed_all_cold(total: int, largest: int, n: int) -> dict[str, int]:
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as z3
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as z2
    except Exception:  # noqa: BLE001 - deepspeed not installed: the same formulas, reproduced
        from kolora_probe.memory.distributed import deepspeed_model_states_bytes as ours

        return {"zero2": ours("zero2", total, n), "zero3": ours("zero3", total, n, largest)}
    return {"zero2": z2(total, n, 1, cpu_offload=False)[1], "zero3": z3(total, largest, n, 1, False, False)[1]}


def main(argv: list[str] | None = None) -> int:
    from kolora_probe.memory.budget import estimate
    from kolora_probe.memory.distributed import param_facts, rank_estimate
    from kolora_probe.model.meta import build_meta_model
    from kolora_probe.plan.schema import DistributedSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--only")
    ap.add_argument("--fsdp-method", default="trace", choices=("trace", "closed_form"))
    a = ap.parse_args(argv)
    rows = []
    for model, label, config, shape in configs():
        if a.only and model != a.only:
            continue
        single = estimate(config, shape, "trace")
        facts = param_facts(config, shape)
        base = build_meta_model(config, "fp32")
        total = sum(dict((id(p), p.numel()) for p in base.parameters()).values())
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in base.modules())
        for n in RANKS:
            row = {"model": model, "config": label, "ranks": n, "one_gpu": single.predicted_peak_bytes}
            for strategy in ("ddp", "fsdp", "zero2", "zero3"):
                t0 = time.perf_counter()
                e = rank_estimate(config, shape, DistributedSpec(strategy=strategy, world_size=n), single=single,
                                  facts=facts, method=a.fsdp_method if strategy == "fsdp" else "trace")
                row[strategy] = e.per_rank_peak_bytes
                row[f"{strategy}_method"] = e.method
                row[f"{strategy}_s"] = round(time.perf_counter() - t0, 1)
            row["deepspeed_all_cold"] = deepspeed_all_cold(total, largest, n)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = ROOT / "benchmarks" / "results" / "distributed_grid.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print("| model | configuration | ranks | one GPU | DDP | FSDP2 | ZeRO-2 | ZeRO-3 | DeepSpeed estimator ZeRO-2 / ZeRO-3 (model states, all params trainable) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        g = lambda b: f"{b / GIB:,.2f}"  # noqa: E731
        fs = g(r["fsdp"]) + ("" if r["fsdp_method"] == "fsdp2_mem_tracker" else "*")
        print(f"| {r['model']} | {r['config']} | {r['ranks']} | {g(r['one_gpu'])} | {g(r['ddp'])} | {fs} | "
              f"{g(r['zero2'])} | {g(r['zero3'])} | {g(r['deepspeed_all_cold']['zero2'])} / "
              f"{g(r['deepspeed_all_cold']['zero3'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
