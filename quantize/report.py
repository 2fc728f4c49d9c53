"""What a quantization costs and buys, measured on the user's model and machine: size, bits
per weight, decode speed, and quality against a reference (KL divergence of the next-token
distributions, top-1 agreement, perplexity on an evaluation text).

The reference's log-probabilities are computed once and kept in a float32 memory-mapped file
beside the outputs, so only one model is loaded at a time.
"""

from __future__ import annotations

import ctypes
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from infer_cli.errors import BadOption

DEFAULT_EVAL_TOKENS = 2048
DEFAULT_CTX = 512
# Rows of logits turned into log-probabilities at a time: a few MiB, inside the CPU's caches.
SOFTMAX_BLOCK_BYTES = 4 << 20


@dataclass
class Quality:
    kl_mean: float
    kl_p99: float
    top1: float          # share of positions where the argmax agrees with the reference's
    ppl: float
    ref_ppl: float
    positions: int


@dataclass
class Row:
    """One line of the report."""

    name: str
    path: str
    size: int
    bpw: float
    seconds: float | None  # time to make it; None for the reference
    decode_tps: float | None = None
    quality: Quality | None = None
    imatrix: str | None = None     # the importance matrix it was made with
    scratch: bool = False          # made for this report only (the type without the imatrix)

    def as_dict(self) -> dict:
        return asdict(self)


def default_eval_text() -> str:
    """English prose that ships with Python: the language reference topics of pydoc."""
    from pydoc_data.topics import topics

    keys = ("if", "while", "for", "try", "with", "function", "class", "assignment", "import",
            "lambda", "types", "datamodel", "exceptions", "naming", "execmodel")
    return "\n\n".join(topics[k] for k in keys if k in topics)


def eval_text(path: Path | None) -> str:
    if path is None:
        return default_eval_text()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadOption("--eval-text", str(path), f"a readable UTF-8 text file ({e})") from None
    if not text.strip():
        raise BadOption("--eval-text", str(path), "a file with some text in it")
    return text


def log_softmax_blocks(session, tokens: list[int]):
    """Decode ``tokens`` in ``session`` (every position's logits) and yield their
    log-probabilities as ``log_softmax_rows`` does."""
    import numpy as np

    session.clear()
    session.decode_all(tokens)
    logits = np.ctypeslib.as_array(session.L.llama_get_logits(session.ptr),
                                   shape=(len(tokens), session.model.n_vocab))
    yield from log_softmax_rows(logits)


def log_softmax_rows(logits):
    """Yield (first row, float32 log-probabilities of that row and the next few) for a
    (positions, vocabulary) array of logits, a block of rows at a time: the softmax of a whole
    chunk at once (1024 positions of a 262k vocabulary are a gigabyte) would run at memory
    speed through temporaries of that size, while a block stays in the CPU's caches. The
    blocks are views of one scratch buffer: use each before asking for the next."""
    import numpy as np

    n, n_vocab = logits.shape
    rows = max(1, min(n, SOFTMAX_BLOCK_BYTES // (4 * n_vocab)))
    x = np.empty((rows, n_vocab), np.float32)
    e = np.empty_like(x)
    for i in range(0, n, rows):
        k = min(rows, n - i)
        xb, eb = x[:k], e[:k]
        src = logits[i:i + k]
        np.subtract(src, src.max(axis=1, keepdims=True), out=xb)
        np.exp(xb, out=eb)
        xb -= np.log(eb.sum(axis=1, keepdims=True))
        yield i, xb


class _Scorer:
    """A model with a context that returns logits for every position of a chunk."""

    def __init__(self, path: Path, n_ctx: int, threads: int | None, kv: tuple[str, str] = ("f16", "f16")):
        from infer_cli.engine import Options, Model, Session

        opts = Options(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, threads=threads,
                       cache_type_k=kv[0], cache_type_v=kv[1], warmup=False)
        self.model = Model(path, opts)
        self.session = Session(self.model, opts)
        self.L = self.model.L
        self.n_ctx = n_ctx
        self.n_vocab = self.model.n_vocab

    def blocks(self, tokens: list[int]):
        """``log_softmax_blocks`` of this scorer's session over ``tokens``."""
        return log_softmax_blocks(self.session, tokens)

    def logprobs(self, tokens: list[int], out=None):
        """(len(tokens), n_vocab) float32 log-probabilities after each token, into ``out`` when
        given (an array of that shape, the reference's memory-mapped file)."""
        import numpy as np

        if out is None:
            out = np.empty((len(tokens), self.n_vocab), np.float32)
        for i, lp in self.blocks(tokens):
            out[i:i + len(lp)] = lp
        return out

    def close(self) -> None:
        self.session.close()
        self.model.close()


def chunks(path: Path, text: str, n_tokens: int, n_ctx: int) -> list[list[int]]:
    """The evaluation text as chunks of ``n_ctx`` tokens, each starting with BOS when the model
    uses one (as llama-perplexity does)."""
    from infer_cli.engine import Options, Model

    model = Model(path, Options(n_ctx=n_ctx, warmup=False))
    try:
        toks = model.tokenize(text, add_special=False, parse_special=False)
        bos = model.L.llama_vocab_bos(model.vocab)
        add_bos = bool(model.L.llama_vocab_get_add_bos(model.vocab)) and bos >= 0
    finally:
        model.close()
    body = n_ctx - 1 if add_bos else n_ctx
    toks = toks[:n_tokens]
    out = [([bos] if add_bos else []) + toks[i:i + body] for i in range(0, len(toks), body)]
    out = [c for c in out if len(c) >= 8]
    if not out:
        raise BadOption("--eval-text", "(text)", f"at least 8 tokens of text (got {len(toks)})")
    return out


class Reference:
    """The reference's log-probabilities over the evaluation chunks, in a temporary file.

    ``kv`` is the KV cache's (key, value) type, for the reference and, unless ``compare`` is
    given another, for what is compared with it (`infer bench` measures quantized KV caches
    against f16 with this)."""

    def __init__(self, path: Path, text: str, *, n_tokens: int = DEFAULT_EVAL_TOKENS,
                 n_ctx: int = DEFAULT_CTX, threads: int | None = None, workdir: Path | None = None,
                 kv: tuple[str, str] = ("f16", "f16")):
        import numpy as np

        self.chunks = chunks(path, text, n_tokens, n_ctx)
        self.n_ctx, self.threads, self.kv = n_ctx, threads, kv
        scorer = _Scorer(path, n_ctx, threads, kv)
        try:
            total = sum(len(c) for c in self.chunks)
            self._tmp = tempfile.NamedTemporaryFile(dir=workdir, prefix=".infer-ref-", suffix=".f32")
            self.lp = np.memmap(self._tmp.name, dtype=np.float32, mode="w+",
                                shape=(total, scorer.n_vocab))
            self.nll: list[float] = []
            pos = 0
            for c in self.chunks:
                lp = scorer.logprobs(c, out=self.lp[pos:pos + len(c)])
                self.nll.extend(-lp[np.arange(len(c) - 1), c[1:]])
                pos += len(c)
        finally:
            scorer.close()
        self.ppl = float(np.exp(np.mean(self.nll)))

    def compare(self, path: Path, *, kv: tuple[str, str] | None = None) -> Quality:
        import numpy as np

        scorer = _Scorer(path, self.n_ctx, self.threads, kv or self.kv)
        kls, agree, nll = [], 0, []
        try:
            pos = 0
            for c in self.chunks:
                last = len(c) - 1  # the last position has no next token to score
                for i, lp in scorer.blocks(c):
                    k = min(len(lp), last - i)
                    if k <= 0:
                        break
                    lp = lp[:k]
                    ref = np.asarray(self.lp[pos + i:pos + i + k])
                    kls.append((np.exp(ref) * (ref - lp)).sum(axis=1))
                    agree += int((ref.argmax(axis=1) == lp.argmax(axis=1)).sum())
                    nll.extend(-lp[np.arange(k), c[i + 1:i + 1 + k]])
                pos += len(c)
        finally:
            scorer.close()
        kl = np.concatenate(kls)
        return Quality(float(kl.mean()), float(np.percentile(kl, 99)), agree / len(kl),
                       float(np.exp(np.mean(nll))), self.ppl, int(len(kl)))

    def close(self) -> None:
        self._tmp.close()


def decode_speed(path: Path, n_tokens: int = 64, threads: int | None = None) -> float:
    """Greedy decode tokens/s after a short prompt, through the engine."""
    from infer_cli.engine import Options, Model, Request, Sampling, Session, stream

    opts = Options(n_ctx=512, threads=threads)
    model = Model(path, opts)
    session = Session(model, opts)
    try:
        prompt = tuple(model.tokenize("The history of the printing press"))
        req = Request(prompt, Sampling(temperature=0, repeat_penalty=1.0), n_tokens, (), True)
        last = None
        for ev in stream(session, req):
            last = ev
        return last.stats.decode_tps if last else 0.0
    finally:
        session.close()
        model.close()


def iter_rows(reference: Path, outputs: list, *, text: str, eval_tokens: int = DEFAULT_EVAL_TOKENS,
              n_ctx: int = DEFAULT_CTX, decode_tokens: int = 64, threads: int | None = None,
              workdir: Path | None = None, baselines: dict | None = None) -> Iterator[Row]:
    """The reference row, then one per output (``QuantResult``s), measured one at a time;
    ``baselines`` (output path -> the same type made without its importance matrix) adds that
    one's row right after the output's."""
    from infer_cli.models.gguf_info import read_gguf

    ref = Reference(reference, text, n_tokens=eval_tokens, n_ctx=n_ctx, threads=threads,
                    workdir=workdir)
    try:
        info = read_gguf(reference)
        size = Path(reference).stat().st_size
        top = Row("reference", str(reference), size, size * 8 / max(info.n_params, 1), None,
                  decode_speed(reference, decode_tokens, threads) if decode_tokens else None,
                  Quality(0.0, 0.0, 1.0, ref.ppl, ref.ppl, sum(len(c) - 1 for c in ref.chunks)))
        yield top
        for res in outputs:
            if _same_file(res.path, reference):
                # The output is the reference (a checkpoint converted to F16, say): its numbers
                # are the reference's, and measuring it against itself would only cost time.
                yield Row(res.qtype, str(res.path), res.size, res.bpw, res.seconds,
                          top.decode_tps, top.quality)
                continue
            tps = decode_speed(res.path, decode_tokens, threads) if decode_tokens else None
            yield Row(res.qtype, str(res.path), res.size, res.bpw, res.seconds, tps,
                      ref.compare(res.path), getattr(res, "imatrix", None))
            plain = (baselines or {}).get(str(res.path))
            if plain is not None:
                tps = decode_speed(plain.path, decode_tokens, threads) if decode_tokens else None
                yield Row(plain.qtype, str(plain.path), plain.size, plain.bpw, plain.seconds, tps,
                          ref.compare(plain.path), getattr(plain, "imatrix", None), True)
    finally:
        ref.close()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return Path(a).samefile(b)
    except OSError:
        return False
