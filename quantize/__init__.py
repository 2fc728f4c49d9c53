"""Hugging Face checkpoints to GGUF, and quantization through llama.cpp (see the quantize issue)."""
