"""peft-diffusion: turn any causal Hugging Face LM into a masked diffusion LM.

Importing the package registers `DiffusionConfig` / `DiffusionLM` with transformers' Auto classes (and nothing else
happens at import, except that `_import_notices` leaves out one notice bitsandbytes prints while PEFT imports it).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from . import _import_notices  # noqa: F401 (first: it must run before PEFT is imported)
from .config import DiffusionConfig
from .conversion import get_diffusion_model
from .data import DistillationStats, self_distilled_dataset
from .evaluation import (
    LikelihoodEstimate,
    PerplexityBound,
    ar_nll_per_token,
    loglikelihood,
    loglikelihood_batch,
    nll_per_token,
)
from .generation import DiffusionGenerateOutput, DiffusionGenerationConfig
from .mixture import mix_plain_text
from .model import DiffusionLM, DiffusionLMOutput
from .speculation import SpeculativeGenerateOutput, speculative_generate
from .trainer import DiffusionTrainer
from .training_config import DiffusionTrainingConfig

__version__ = "0.1.0.dev0"

AutoConfig.register(DiffusionConfig.model_type, DiffusionConfig, exist_ok=True)
AutoModelForCausalLM.register(DiffusionConfig, DiffusionLM, exist_ok=True)

__all__ = [
    "DiffusionConfig",
    "DiffusionGenerateOutput",
    "DiffusionGenerationConfig",
    "DiffusionLM",
    "DiffusionLMOutput",
    "DiffusionTrainer",
    "DiffusionTrainingConfig",
    "DistillationStats",
    "get_diffusion_model",
    "LikelihoodEstimate",
    "PerplexityBound",
    "ar_nll_per_token",
    "loglikelihood",
    "loglikelihood_batch",
    "mix_plain_text",
    "nll_per_token",
    "self_distilled_dataset",
    "SpeculativeGenerateOutput",
    "speculative_generate",
    "__version__",
]
