"""The model: where it comes from, loading its weights safely, the meta-device build, its structure, generation and the tokenizer-model agreement."""
