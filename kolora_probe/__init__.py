"""kolora-probe: validate the machine, libraries, model and plan before a LoRA/QLoRA fine-tuning run.

The library never calls pytest: it returns dataclasses (facts, estimates, measurements) that the checks in
``checks/`` assert on and the CLI prints.
"""
__version__ = "0.1.0"
