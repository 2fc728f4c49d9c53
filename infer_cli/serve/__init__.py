"""`infer serve`: an OpenAI-compatible HTTP server on the batching engine (see app.py)."""
