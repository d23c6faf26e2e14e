"""The one PEFT LoraConfig builder: settings passed through, PEFT's all-linear shorthand, Conv1D fan_in_fan_out."""
import warnings

from kolora_probe.lora.config import peft_lora_config


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=16, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def test_settings_pass_through():
    c = peft_lora_config(("c_attn", "lm_head"), 4, 8.0, 0.1, "lora_only", ("wte",), fan_in_fan_out=True)
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias) == (4, 8.0, 0.1, "lora_only")
    assert set(c.target_modules) == {"c_attn", "lm_head"} and c.modules_to_save == ["wte"]
    assert c.fan_in_fan_out is True and c.task_type == "CAUSAL_LM"
    assert peft_lora_config(["c_attn"], 2, 4, 0.0).modules_to_save is None


def test_all_linear_shorthand_adapts_every_linear_layer_but_the_head():
    """A list ["all-linear"] would be looked up by PEFT as a module name and match nothing."""
    from peft import get_peft_model

    c = peft_lora_config(["ALL-LINEAR"], 2, 4, 0.0)
    assert c.target_modules == "all-linear"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_gpt2(), c)
    adapted = sorted(n.split(".", 5)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")
                     and hasattr(m, "base_layer"))
    assert adapted == ["attn.c_attn", "attn.c_attn", "attn.c_proj", "attn.c_proj", "mlp.c_fc", "mlp.c_fc",
                       "mlp.c_proj", "mlp.c_proj"], adapted


def test_throughput_lora_copy_accepts_all_linear():
    from kolora_probe.plan.schema import BudgetSpec, LoraSpec, ModelSpec, Plan, TrainingSpec
    from kolora_probe.memory.throughput import lora_copy

    plan = Plan(ModelSpec("tiny"), LoraSpec(r=2, alpha=4, dropout=0.0, target_modules=("all-linear",)),
                TrainingSpec(batch_size=2, seq_len=6), BudgetSpec(gpu_memory_gib=1))
    model = lora_copy(tiny_gpt2(), plan)
    # 2 layers × LoRA r=2 on c_attn 8→24, c_proj 8→8, c_fc 8→32, mlp.c_proj 32→8
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * ((8 + 24) + (8 + 8) + (8 + 32) + (32 + 8))
    assert all(m.fan_in_fan_out for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
