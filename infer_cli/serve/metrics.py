"""/metrics in Prometheus' text format.

A registry of its own per app (not prometheus-client's global one), so two apps in one process
never collide and nothing else in the process leaks into the page. Counters are bumped as
requests and sequences end; the gauges are read at scrape time from the engine's snapshot.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("infer_requests", "HTTP requests answered, by path and status.",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter("infer_prompt_tokens", "Prompt tokens of finished sequences "
                                     "(computed or copied from a shared prefix).", registry=r)
        self.cached_tokens = Counter("infer_prompt_cached_tokens", "Prompt tokens whose KV was "
                                     "reused (copied from another sequence, or restored from the "
                                     "prompt cache) instead of computed.", registry=r)
        self.generated_tokens = Counter("infer_generated_tokens", "Tokens generated.", registry=r)
        self.sequences = Counter("infer_sequences", "Sequences finished, by finish reason.",
                                 ["finish_reason"], registry=r)
        self._engine = None
        self._n_ctx = 0
        g = lambda name, doc: Gauge(name, doc, registry=r)  # noqa: E731
        g("infer_sequences_running", "Sequences in a KV slot now.").set_function(
            lambda: self._snap("running"))
        g("infer_queue_depth", "Sequences waiting for a slot.").set_function(
            lambda: self._snap("waiting"))
        g("infer_kv_cells_used", "KV cells in use (a shared prefix counted once per sequence: an "
          "upper bound).").set_function(lambda: self._snap("kv_used"))
        g("infer_kv_cells_cached", "Tokens whose KV the prompt cache keeps for the next requests "
          "(in host memory; for a sliding-window model, in idle slots until the cells are "
          "needed).").set_function(lambda: self._snap("kv_cached"))
        g("infer_prompt_cache_bytes", "Host memory the prompt cache holds (at most the context's "
          "tokens and a quarter of the memory free at start).").set_function(
            lambda: self._snap("cache_bytes"))
        g("infer_kv_cells_total", "KV cells in the context.").set_function(lambda: self._n_ctx)
        g("infer_prefill_tokens_per_second", "Prompt tokens computed per second, last second."
          ).set_function(lambda: self._snap("prefill_tps"))
        g("infer_decode_tokens_per_second", "Tokens generated per second over all sequences, "
          "last second.").set_function(lambda: self._snap("decode_tps"))

    def attach(self, engine, n_ctx: int) -> None:
        self._engine, self._n_ctx = engine, n_ctx

    def _snap(self, name: str) -> float:
        return getattr(self._engine.snapshot, name) if self._engine is not None else 0

    def finished(self, res: dict) -> None:
        """A sequence ended (called on the engine thread: prometheus-client is thread-safe)."""
        self.prompt_tokens.inc(res["n_prompt"])
        self.cached_tokens.inc(res["cached_tokens"])
        self.generated_tokens.inc(res["n_generated"])
        self.sequences.labels(res["finish_reason"] or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
