"""Classify every causal-LM model type of the installed transformers for `peft_diffusion/architectures.py`.

For each model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`: build a tiny random model (tests/tiny_models.py), and
under eager and sdpa run `architectures.dependency_failures` (every pattern, clean context, unmasked). Known
non-attention token mixers and chunked attention are refused by structure first (a perturbation check passes through
their attention layers). Prints the verdicts, a diff against the table, and, with `--emit`, the table as Python.

    HF_HUB_OFFLINE=1 python benchmarks/classify_architectures.py                # all model types, diff vs the table
    HF_HUB_OFFLINE=1 python benchmarks/classify_architectures.py llama gpt2     # some model types
    HF_HUB_OFFLINE=1 python benchmarks/classify_architectures.py --json out.json --emit
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
import transformers  # noqa: E402
from tiny_models import build_tiny_causal_lm  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from peft_diffusion import architectures  # noqa: E402
from peft_diffusion.architectures import ATTENTION_LAYER_TYPES  # noqa: E402
from peft_diffusion.probe import tiny_model_failures  # noqa: E402

BACKENDS = ("eager", "sdpa")

# Module class names of token mixers other than attention (matched on the tiny model's modules).
NON_ATTENTION_MIXERS = {
    r"Mamba": "mamba (selective state-space) layers",
    r"Rwkv": "a recurrent (RWKV) mixer",
    r"[xX][lL][sS][tT][mM]": "a recurrent (xLSTM) mixer",
    r"RecurrentBlock|Rglru": "recurrent (RG-LRU) layers",
    r"GatedDeltaNet|DeltaNet": "linear-attention (gated delta net) layers",
    r"LinearAttention|Lightning": "linear-attention layers",
    r"ShortConv": "short causal convolutions",
    r"KimiDelta": "linear-attention (kimi delta attention) layers",
}


def structural_refusal(model_type: str) -> tuple[str, str] | None:
    """Refusals by structure, before any model is built: non-attention mixers (classes of the modeling module),
    chunked attention and non-attention layer kinds (the default config)."""
    causal_lm_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    module = sys.modules[causal_lm_class.__module__]
    names = {
        name for name, value in vars(module).items() if isinstance(value, type) and value.__module__ == module.__name__
    }
    for pattern, detail in NON_ATTENTION_MIXERS.items():
        hits = sorted(name for name in names if re.search(pattern, name))
        if hits:
            return "non_attention_mixer", f"{detail}: {hits[0]}"
    try:
        config = transformers.AutoConfig.for_model(model_type).get_text_config()
    except Exception:  # noqa: BLE001 - the default config may not validate; the tiny build reports it
        return None
    if getattr(config, "attention_chunk_size", None) or "chunked_attention" in (
        getattr(config, "layer_types", None) or ()
    ):
        return "chunked_attention", "chunked attention layers (attention_chunk_size)"
    other = sorted({kind for kind in getattr(config, "layer_types", None) or () if kind not in ATTENTION_LAYER_TYPES})
    if other:
        return "non_attention_mixer", f"layers of kind {other}"
    return None


def classify(model_type: str) -> tuple[str, str, str]:
    """(verdict, category, detail): verdict 'verified' or 'refused'."""
    refusal = structural_refusal(model_type)
    if refusal is not None:
        return ("refused", *refusal)
    failures = []
    for backend in BACKENDS:
        try:
            model = build_tiny_causal_lm(model_type, backend)
            with torch.no_grad():  # the tiny model must run as a plain causal LM before any pattern is tried
                model(input_ids=torch.arange(3, 15)[None], use_cache=False)
        except Exception as error:  # noqa: BLE001
            text = str(error).strip().splitlines()[0][:150] if str(error).strip() else ""
            if backend == "sdpa" and "does not support" in text:
                continue  # transformers has no sdpa path for it: verified on eager alone
            return "refused", "no_tiny_config", f"{type(error).__name__}: {text}"
        failures += tiny_model_failures(model)
    if not failures:
        return "verified", "", ""
    crashes = [f for f in failures if f.crashed]
    if crashes:
        return "refused", "crashes_under_diffusion_mask", str(crashes[0])
    return "refused", "mask_outside_masking_utils", "; ".join(str(f) for f in failures[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="default: every causal LM of the installed transformers")
    parser.add_argument("--json", help="write the verdicts to this file")
    parser.add_argument("--emit", action="store_true", help="print the verdicts as the table's Python source")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    model_types = args.model_types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    print(f"transformers {transformers.__version__}: {len(model_types)} model types", flush=True)
    results = {}
    for model_type in model_types:
        start = time.perf_counter()
        try:
            verdict, category, detail = classify(model_type)
        except Exception as error:  # noqa: BLE001
            verdict, category, detail = "refused", "no_tiny_config", f"{type(error).__name__}: {str(error)[:150]}"
        results[model_type] = (verdict, category, detail)
        print(f"{model_type:28s} {verdict:9s} {category:30s} {time.perf_counter() - start:5.1f}s {detail}", flush=True)

    # the diff against the table
    changes = []
    for model_type, (verdict, category, detail) in results.items():
        if verdict == "verified" and model_type not in architectures.VERIFIED_ARCHITECTURES:
            changes.append(f"+ verified {model_type}")
        if verdict == "refused" and architectures.REFUSED_ARCHITECTURES.get(model_type, (None,))[0] != category:
            changes.append(f"+ refused  {model_type}: {category} ({detail})")
    print(f"\n{len(changes)} differences from peft_diffusion/architectures.py:" if changes else "\nTable up to date.")
    print("\n".join(changes))
    counts = {}
    for verdict, category, _ in results.values():
        counts[category or verdict] = counts.get(category or verdict, 0) + 1
    print("counts:", json.dumps(counts))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"transformers": transformers.__version__, "results": results}, indent=1)
        )
    if args.emit:
        verified = [t for t, (v, _, _) in results.items() if v == "verified"]
        print("VERIFIED_ARCHITECTURES = (\n" + "".join(f"    {t!r},\n" for t in verified) + ")")
        print("REFUSED_ARCHITECTURES = {")
        for t, (v, c, d) in results.items():
            if v == "refused":
                print(f"    {t!r}: ({c!r}, {d!r}),")
        print("}")


if __name__ == "__main__":
    main()
