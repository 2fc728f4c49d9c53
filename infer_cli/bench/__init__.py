"""`infer bench`: the trade-off table of precision, KV cache type, flash attention, batching and
speculative decoding, measured for one model on this machine.

- ``measure``: the timed runs (prefill, decode, a batch, speculation) through the engine, the
  medians and spread of repetitions, and the machine's load;
- ``sections``: what each section measures, its time estimate, and why it is skipped when it
  cannot run (``Bench``);
- ``results``: the result document: the summary table, saving under ``$INFER_HOME/bench``,
  the last saved result, and the comparison with it;
- ``plot``: the picture (matplotlib, an optional extra).

Library code: it returns values and raises the typed errors of ``infer_cli.errors``; only
``infer_cli.cli.bench`` prints.
"""

SECTIONS = ("precision", "kv", "flash-attn", "batching", "speculative")
