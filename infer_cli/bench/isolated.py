"""`infer bench --rpc`: the measuring in a child process.

llama.cpp aborts its process when an RPC worker stops answering; ``IsolatedBench`` keeps
``sections.Bench`` in a child (through ``engine.isolated.IsolatedCall``) and shows the command
the same interface (``estimate``, ``run``, the facts the result document names), so that a
worker that dies ends the bench with ``WorkerLost`` naming it instead of killing `infer`.
"""

from __future__ import annotations

from types import SimpleNamespace


class IsolatedBench:
    def __init__(self, settings):
        from infer_cli.engine.isolated import IsolatedCall

        self.child = IsolatedCall("infer_cli.bench.isolated:serve", endpoints=settings.rpc)
        try:
            facts = self.child.ask("init", settings, when="while the model was planned")
        except BaseException:
            self.child.kill()
            raise
        self.src_type, self.reps, self.ctx = facts["src_type"], facts["reps"], facts["ctx"]
        self.info = SimpleNamespace(n_params=facts["n_params"])
        self.base = SimpleNamespace(threads=facts["threads"])
        self.notes = facts["notes"]

    def estimate(self) -> dict[str, float]:
        return self.child.ask("estimate", when="while the model was calibrated")

    def run(self, progress=None, estimate=None):
        """The child's sections as they finish. Ctrl-C stops the child at once."""
        self.child.post("run", estimate)
        try:
            while True:
                msg = self.child.read("while the bench measured")
                if msg[0] == "progress":
                    if progress is not None:
                        progress(*msg[1:])
                elif msg[0] == "section":
                    yield msg[1]
                elif msg[0] == "done":
                    self.notes = msg[1]
                    return
        except KeyboardInterrupt:
            self.child.kill()
            raise

    def close(self) -> None:
        self.child.close()


def serve(pipe_in, pipe_out) -> None:
    """The child's side: a ``Bench`` answering init, estimate and run."""
    from infer_cli.bench.sections import Bench
    from infer_cli.engine.isolated import receive, send, send_error
    from infer_cli.errors import InferError

    bench = None
    while True:
        try:
            msg = receive(pipe_in)
        except EOFError:
            return
        try:
            if msg[0] == "init":
                bench = Bench(msg[1])
                send(pipe_out, ("ok", {"src_type": bench.src_type, "reps": bench.reps,
                                       "ctx": bench.ctx, "n_params": bench.info.n_params,
                                       "threads": bench.base.threads, "notes": bench.notes}))
            elif msg[0] == "estimate":
                send(pipe_out, ("ok", bench.estimate()))
            elif msg[0] == "run":
                progress = lambda *a: send(pipe_out, ("progress", *a))  # noqa: E731
                for sec in bench.run(progress, msg[1]):
                    send(pipe_out, ("section", sec))
                send(pipe_out, ("done", bench.notes))
            elif msg[0] == "close":
                return
        except InferError as err:
            send_error(pipe_out, err)
