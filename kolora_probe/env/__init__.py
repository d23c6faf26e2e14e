"""The machine and its libraries: facts, requirements against installed versions, NVML, the bitsandbytes round trip."""
