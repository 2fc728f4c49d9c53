"""Chat prompts: the model's own Jinja template (from its GGUF), rendered in a sandbox.

Templates come inside downloaded files, so they run in Jinja's immutable sandbox: no attribute
tricks, no mutation of what we pass in. Helpers the Hugging Face templates expect
(``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII) are provided.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

from infer_cli.errors import TemplateFailed


def _raise(message: str):
    raise TemplateFailed(message)


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):
    """A template compiled once: a batch or a server renders the same one for every request."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def render(template: str, messages: list[dict], *, bos: str = "", eos: str = "",
           add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` as the model was trained to see it."""
    from jinja2 import TemplateError

    try:
        return _compile(template).render(
            messages=messages, bos_token=bos, eos_token=eos,
            add_generation_prompt=add_generation_prompt)
    except TemplateFailed:
        raise
    except TemplateError as e:
        raise TemplateFailed(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


@dataclass
class Conversation:
    """The messages so far; ``prompt()`` renders them with the template, or joins them raw."""

    template: str | None
    system: str | None = None
    bos: str = ""
    eos: str = ""
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})

    def prompt(self) -> str:
        if self.template is None:  # plain completion: the text so far, as is
            return "".join(m["content"] for m in self.messages)
        return render(self.template, self.messages, bos=self.bos, eos=self.eos)
