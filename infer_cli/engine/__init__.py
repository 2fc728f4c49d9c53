"""Generation through llama.cpp's C API, in layers as in mlx-lm.

- ``model``: ``Model``, a loaded GGUF (weights, vocabulary, tokenizer);
- ``context``: ``Context`` (a llama.cpp context: the KV cache of one or many sequences) and
  ``Session`` (one sequence of it and the tokens its cache holds);
- ``sampling``: ``Sampling`` settings, the native ``Sampler`` chain, ``StopFilter``;
- ``generate``: ``stream``, a generator of ``Event``s with honest timings;
- ``speculative``, ``prompt_cache``, ``chat``: drafts, KV state on disk, chat templates;
- ``runner``: loading a model for a command and answering a conversation with it.

The loop calls llama.cpp once per step with preallocated ctypes buffers, so Python costs little
next to the decode itself. Nothing here imports llama_cpp until a model is loaded.
"""

from infer_cli.engine.context import Context, Session
from infer_cli.engine.generate import Event, Stats, check_fits, peak_rss, stream, truncate
from infer_cli.engine.model import Model, default_threads, load_mode
from infer_cli.engine.sampling import Sampler, Sampling, StopFilter
from infer_cli.engine.sequence import Request
from infer_cli.options import Options

__all__ = ["Context", "Event", "Model", "Options", "Request", "Sampler", "Sampling", "Session",
           "Stats", "StopFilter", "check_fits", "default_threads", "load_mode", "peak_rss",
           "stream", "truncate"]
