"""Integrations with other tools, each an optional extra imported only on demand (nothing here is imported by
`import peft_diffusion`).

- `peft_diffusion.integrations.lm_eval`: the lm-evaluation-harness model `"peft_diffusion"` (`DiffusionLMEval`; the
  `eval` extra).
"""
