"""LoRA settings and counts: PEFT's LoraConfig for a plan, trainable parameters by hand and by PEFT."""
