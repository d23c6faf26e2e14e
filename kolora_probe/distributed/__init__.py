"""Multi-GPU launches: reading accelerate/DeepSpeed configs and the per-rank launch pre-flight."""
