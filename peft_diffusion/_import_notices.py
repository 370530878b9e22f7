"""Notices that other libraries print while they are imported, and that importing peft-diffusion leaves out.

bitsandbytes (the qlora and test extras) logs, while PEFT imports it, that an optional Hub kernel for 4-bit matmuls on
CPU could not be loaded (on CPUs with AVX512-BF16, without the `kernels` package). It is not an error: 4-bit layers
fall back to bitsandbytes' own code. Printed before anything else, it also came ahead of the one-line errors of the
`peft-diffusion` command, which quiets libraries only once it runs. With the Hub offline (`HF_HUB_OFFLINE=1`), the
`kernels` package (a dependency of transformers >= 5.25) first logs that it skips the publisher check of that same
kernel repository. The filters drop those two messages, nothing else.
"""

from __future__ import annotations

import logging

BITSANDBYTES_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"

BITSANDBYTES_KERNEL_OFFLINE_NOTICE = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"

logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith(BITSANDBYTES_KERNEL_NOTICE)
)
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: not record.getMessage().startswith(BITSANDBYTES_KERNEL_OFFLINE_NOTICE)
)
