"""`python -m peft_diffusion.cli`: the `peft-diffusion` command."""

from .main import entry_point

entry_point()
