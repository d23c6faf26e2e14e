"""GPU (NVML) and system memory monitor: samples, summary, timeline."""
