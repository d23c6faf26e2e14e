"""The tokenizer: loading it as the plan says and its checks on the Korean sample."""
