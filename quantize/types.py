"""The precisions llama.cpp can write: one table (STYLE.md point 7) that feeds the CLI's
choices, its help, `infer quantize --list` and the report.

Plain data, no imports of llama_cpp, so the CLI can read it at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantType:
    name: str           # what users type: Q4_K_M
    ftype: int          # llama_ftype
    bpw: float          # bits per weight of the main tensors (the block format's own rate)
    description: str
    needs_imatrix: bool = False


# Bits per weight are those of the block formats (ggml-common.h); mixes name their main type.
# Quality notes follow llama.cpp's tools/quantize table (Llama-3-8B perplexity increase).
TYPES: tuple[QuantType, ...] = (
    QuantType("F32", 0, 32.0, "full precision; the size of the checkpoint in float32"),
    QuantType("F16", 1, 16.0, "half precision; lossless for most checkpoints"),
    QuantType("BF16", 32, 16.0, "bfloat16; lossless for bf16-trained checkpoints"),
    QuantType("Q8_0", 7, 8.5, "8-bit, blocks of 32; +0.0026 ppl, practically lossless"),
    QuantType("Q6_K", 18, 6.5625, "6-bit k-quant; +0.0217 ppl"),
    QuantType("Q5_K_M", 17, 5.5, "5-bit k-quant mix (some tensors Q6_K); +0.0569 ppl"),
    QuantType("Q5_K_S", 16, 5.5, "5-bit k-quant; +0.1049 ppl"),
    QuantType("Q5_1", 9, 6.0, "5-bit legacy with offset; +0.1062 ppl"),
    QuantType("Q5_0", 8, 5.5, "5-bit legacy; +0.1316 ppl"),
    QuantType("Q4_K_M", 15, 4.5, "4-bit k-quant mix (some tensors Q6_K); +0.1754 ppl, the usual pick"),
    QuantType("Q4_K_S", 14, 4.5, "4-bit k-quant; +0.2689 ppl"),
    QuantType("Q4_1", 3, 5.0, "4-bit legacy with offset; +0.4511 ppl"),
    QuantType("Q4_0", 2, 4.5, "4-bit legacy; +0.4685 ppl, fast on ARM"),
    QuantType("IQ4_NL", 25, 4.5, "4-bit non-linear, blocks of 32"),
    QuantType("IQ4_XS", 30, 4.25, "4-bit non-linear, super-blocks of 256"),
    QuantType("Q3_K_L", 13, 3.4375, "3-bit k-quant mix (attention/output at Q5_K); +0.5562 ppl"),
    QuantType("Q3_K_M", 12, 3.4375, "3-bit k-quant mix (some tensors Q4_K); +0.6569 ppl"),
    QuantType("Q3_K_S", 11, 3.4375, "3-bit k-quant; +1.6321 ppl"),
    QuantType("IQ3_M", 27, 3.66, "3-bit i-quant mix"),
    QuantType("IQ3_S", 26, 3.44, "3-bit i-quant"),
    QuantType("IQ3_XS", 22, 3.3, "3-bit i-quant, smaller mix; an imatrix is strongly advised"),
    QuantType("IQ3_XXS", 23, 3.0625, "3-bit i-quant, smallest; needs --imatrix", True),
    QuantType("Q2_K", 10, 2.625, "2-bit k-quant mix; +3.5199 ppl, big losses"),
    QuantType("Q2_K_S", 21, 2.625, "2-bit k-quant, smaller; +3.1836 ppl; needs --imatrix", True),
    QuantType("IQ2_M", 29, 2.7, "2-bit i-quant mix; needs --imatrix", True),
    QuantType("IQ2_S", 28, 2.5, "2-bit i-quant; needs --imatrix", True),
    QuantType("IQ2_XS", 20, 2.3125, "2-bit i-quant; needs --imatrix", True),
    QuantType("IQ2_XXS", 19, 2.0625, "2-bit i-quant, smallest; needs --imatrix", True),
    QuantType("Q2_0", 41, 2.25, "2-bit, groups of 64"),
    QuantType("TQ2_0", 37, 2.0625, "ternary, for ternary-trained models (BitNet) only"),
    QuantType("TQ1_0", 36, 1.6875, "ternary, packed, for ternary-trained models only"),
    QuantType("IQ1_M", 31, 1.75, "1-bit i-quant mix; needs --imatrix, severe losses", True),
    QuantType("IQ1_S", 24, 1.5625, "1-bit i-quant; needs --imatrix, severe losses", True),
    QuantType("Q1_0", 40, 1.125, "1-bit, for models trained for it"),
    QuantType("MXFP4_MOE", 38, 4.25, "MXFP4 for the experts of mixture-of-experts models"),
    QuantType("NVFP4", 39, 4.5, "NVFP4 (E4M3 scales), for models trained for it"),
)

# llama.cpp's own aliases.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

BY_NAME = {t.name: t for t in TYPES}

# Tensor types accepted by --output-tensor-type, --token-embedding-type and per-tensor
# overrides: the ggml types llama.cpp's quantizer can write. Their ids are infer_cli.ggml's
# (which imports gguf, too heavy for parse time).
GGML_TYPES = (
    "F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "IQ1_M", "BF16",
    "TQ1_0", "TQ2_0", "MXFP4", "NVFP4", "Q1_0", "Q2_0",
)

# Types a Hugging Face checkpoint converts to directly (no llama.cpp quantization needed).
CONVERT_TYPES = ("F32", "F16", "BF16", "Q8_0")


def lookup(name: str) -> QuantType | None:
    key = name.strip().upper()
    return BY_NAME.get(ALIASES.get(key, key))


def names() -> list[str]:
    return [t.name for t in TYPES]
