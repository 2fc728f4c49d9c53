"""infer: run, quantize and fit GGUF language models locally."""

__version__ = "0.1.0"

# The llama-cpp-python release the engine is written against: it drives llama.cpp through the
# binding's low-level ctypes API, which changes between releases. pyproject.toml pins the same
# version (a test checks that they agree); ``infer_cli.engine.binding`` refuses any other.
PINNED_LLAMA_CPP = "0.3.36"
