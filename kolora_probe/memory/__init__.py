"""Training-step memory: the fake-tensor trace, its CUDA emulation, the closed form, the budget verdict, per-rank memory, real measurements and throughput."""
