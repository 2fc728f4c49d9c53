"""`infer run`: one-shot generation and the interactive chat, rendered for a terminal.

Part of the CLI layer (it prints); the work is done by ``engine``, ``chat`` and
``prompt_cache``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

from . import engine
from .chat import Conversation
from .errors import InferError, describe, human_bytes


@dataclass(frozen=True)
class SpecSettings:
    draft: object | None      # a store.Resolved draft model, or None
    lookup: bool
    draft_max: int = 16
    p_min: float = 0.5


@dataclass(frozen=True)
class RunSettings:
    system: str | None
    raw: bool
    max_tokens: int
    stop: tuple[str, ...]
    ignore_eos: bool
    truncate: bool
    prompt_cache: bool
    sampling: engine.Sampling
    spec: SpecSettings | None = None


class Runner:
    """A loaded model with its session, conversation and prompt cache."""

    def __init__(self, resolved, opts: engine.EngineOptions, settings: RunSettings):
        t0 = time.perf_counter()
        self.model = engine.Model(resolved.path, opts)
        self.session = engine.Session(self.model, opts)
        self.load_s = time.perf_counter() - t0
        self.settings = settings
        template = None if settings.raw else self.model.info.chat_template
        self.conversation = Conversation(template, settings.system, bos=self.model.bos_text,
                                         eos=self.model.eos_text)
        self.notes: list[str] = []
        if template is None and not settings.raw:
            self.notes.append("this model has no chat template: plain completion")
        self.draft_model = self.draft_session = None
        if settings.spec and settings.spec.draft:
            from .speculative import check_compatible

            self.draft_model = engine.Model(settings.spec.draft.path, opts)
            check_compatible(self.model, self.draft_model)
            self.draft_session = engine.Session(self.draft_model, opts)
            self.load_s = time.perf_counter() - t0
        self.cache = None
        if settings.prompt_cache:
            from .prompt_cache import PromptCache, model_identity

            ident = model_identity(resolved.path, self.model.info.data_offset)
            kv = {"n_ctx": self.session.n_ctx, "type_k": opts.cache_type_k,
                  "type_v": opts.cache_type_v, "flash_attn": opts.flash_attn,
                  "swa_full": opts.swa_full}
            self.cache = PromptCache(resolved.path, ident, kv)

    def tokens_for(self, text: str) -> list[int]:
        bos = self.model.bos_text
        # A template that writes the BOS itself must not get a second one from the tokenizer.
        add_special = not (self.conversation.template and bos and text.startswith(bos))
        return self.model.tokenize(text, add_special=add_special, parse_special=True)

    def answer(self, user_text: str):
        """Add a user turn and stream the reply: yields engine events."""
        conv = self.conversation
        conv.add("user", user_text)
        tokens = self.tokens_for(conv.prompt())
        n_ctx = self.session.n_ctx
        if len(tokens) >= n_ctx:
            if not self.settings.truncate:
                conv.messages.pop()
                engine.check_fits(len(tokens), n_ctx)
            reserve = self.settings.max_tokens if self.settings.max_tokens > 0 else n_ctx // 4
            tokens = engine.truncate(tokens, n_ctx, min(reserve, n_ctx // 2))
            self.notes.append(f"the prompt was cut to its last {len(tokens)} tokens (--truncate)")
        s = self.settings
        req = engine.Request(tuple(tokens), s.sampling,
                             s.max_tokens if s.max_tokens > 0 else n_ctx, s.stop, s.ignore_eos)
        stats = engine.Stats(load_s=self.load_s, notes=self.notes)
        parts = []
        for event in engine.stream(self.session, req, stats=stats, prompt_cache=self.cache,
                                   speculator=self._speculator()):
            parts.append(event.text)
            yield event
        conv.add("assistant", "".join(parts))
        self.notes = []
        self.load_s = 0.0  # paid once


    def _speculator(self):
        """A fresh speculator per answer (its statistics are per answer)."""
        spec = self.settings.spec
        if spec is None:
            return None
        from . import speculative

        if spec.lookup:
            return speculative.PromptLookup(draft_max=spec.draft_max,
                                            stats=speculative.SpecStats("lookup", draft_max=spec.draft_max))
        return speculative.DraftModel(draft_max=spec.draft_max, p_min=spec.p_min,
                                      draft_session=self.draft_session,
                                      stats=speculative.SpecStats("draft", draft_max=spec.draft_max))


def stats_line(stats: engine.Stats, finish: str | None) -> str:
    parts = []
    if stats.load_s:
        parts.append(f"load {stats.load_s:.2f} s")
    computed = stats.prompt_tokens - stats.cached_tokens
    prompt = f"prompt {stats.prompt_tokens} tokens"
    if stats.cached_tokens:
        prompt += f" ({stats.cached_tokens} cached)"
    if computed > 0 and stats.prefill_s > 0:
        prompt += f", {stats.prefill_tps:.0f} tokens/s"
    parts.append(prompt)
    parts.append(f"generated {stats.generated_tokens} tokens, {stats.decode_tps:.1f} tokens/s")
    if stats.ttft_s is not None:
        parts.append(f"first token {stats.ttft_s:.2f} s")
    if stats.speculative:
        sp = stats.speculative
        spec = f"{sp['mode']}: {sp['accepted']}/{sp['drafted']} drafted accepted ({sp['acceptance']:.0%})"
        if sp["speedup"]:
            spec += f", {sp['speedup']:.2f}x plain"
        parts.append(spec)
    kv = f"KV {stats.kv_used}/{stats.kv_size} cells"
    if stats.kv_bytes:
        kv += f" ({human_bytes(stats.kv_bytes)})"
    parts.append(kv)
    parts.append(f"peak memory {human_bytes(stats.peak_rss_bytes)}")
    parts.append(f"finish: {finish}")
    return " · ".join(parts)


def one_shot(runner: Runner, prompt: str, out, *, json_mode: bool, resolved) -> int:
    """Stream one answer; returns the exit code (130 when interrupted)."""
    last = None
    text = []
    for event in runner.answer(prompt):
        text.append(event.text)
        last = event
        if not json_mode and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    stats, finish = last.stats, last.finish_reason
    if json_mode:
        out.json({"model": resolved.name, "path": str(resolved.path), "text": "".join(text),
                  "finish_reason": finish, "stats": stats.as_dict(), "notes": stats.notes,
                  "sampling": dataclasses.asdict(runner.settings.sampling)})
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        for note in stats.notes:
            out.info(f"[yellow]note:[/] {note}")
        out.info(f"[dim]{stats_line(stats, finish)}[/]")
    return 130 if finish == "interrupted" else 0


_HELP = ("Type a message; end a line with \\ to continue it, or wrap several lines in \"\"\". "
         "/reset forgets the conversation, /exit or Ctrl-D leaves, Ctrl-C stops an answer.")


def _read_message() -> str | None:
    """One user message from the terminal; None at end of input."""
    try:
        line = input(">>> ")
    except EOFError:
        return None
    if line.strip().startswith('"""'):
        lines = [line.strip()[3:]]
        while not lines[-1].rstrip().endswith('"""') or len(lines) == 1 and lines[0] == "":
            try:
                lines.append(input("... "))
            except EOFError:
                break
        text = "\n".join(lines).rstrip()
        return text[:-3] if text.endswith('"""') else text
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(input("... "))
        except EOFError:
            break
    return "\n".join(lines)


def interactive(runner: Runner, out) -> int:
    """The chat loop: history, multi-line input, /reset, /exit, Ctrl-D."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    out.info(f"[dim]{_HELP}[/]")
    while True:
        try:
            message = _read_message()
        except KeyboardInterrupt:
            out.info("\n[dim](Ctrl-D or /exit leaves)[/]")
            continue
        if message is None or message.strip() in ("/exit", "/bye", "/quit"):
            sys.stdout.write("\n")
            return 0
        if message.strip() == "/reset":
            runner.conversation.reset()
            out.info("[dim]conversation forgotten[/]")
            continue
        if message.strip() in ("/help", "/?"):
            out.info(f"[dim]{_HELP}[/]")
            continue
        if not message.strip():
            continue
        last = None
        try:
            for event in runner.answer(message):
                last = event
                sys.stdout.write(event.text)
                sys.stdout.flush()
        except InferError as err:  # e.g. a message too long for the context: say so, go on
            out.error(str(err), describe(err).hint)
            continue
        sys.stdout.write("\n")
        for note in last.stats.notes:
            out.info(f"[yellow]note:[/] {note}")
        out.info(f"[dim]{stats_line(last.stats, last.finish_reason)}[/]")
