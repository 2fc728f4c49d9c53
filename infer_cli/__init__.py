"""infer: run, quantize and fit GGUF language models locally."""

__version__ = "0.1.0"
