"""The OpenAI wire format, as far as `infer serve` speaks it: request bodies as pydantic models
(so a wrong type is refused before anything runs) and builders for the response objects.

Fields clients commonly send but that change nothing here (``user``, ``metadata``, ``store``...)
are accepted and ignored, as OpenAI-compatible servers do; fields whose meaning cannot be
honoured (tools, logit bias) are refused with a 400 by the app rather than silently dropped, so
a client never gets an answer that quietly ignored what it asked for.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


MAX_TOP_LOGPROBS = 20        # alternatives per token in chat, as OpenAI allows
MAX_COMPLETION_LOGPROBS = 5  # and in the (legacy) completions API


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or the list-of-parts form (text parts only: this runner has no vision).
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchema(_Body):
    name: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchema] = None
    # llama-server's shorthand: {"type": "json_object", "schema": {...}}
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")


class _Sampling(_Body):
    """What chat and completion requests share: length, sampling and llama.cpp's extras."""

    model: Optional[str] = None  # one model is served; any name is accepted
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=10)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    n: int = Field(default=1, ge=1, le=16)
    # chat: true/false (with top_logprobs alternatives); completions: the number of alternatives
    logprobs: Union[bool, int, None] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    logit_bias: Optional[dict[str, float]] = None
    # llama.cpp extras, named as llama-server names them
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    repeat_penalty: Optional[float] = Field(default=None, gt=0)
    repeat_last_n: Optional[int] = Field(default=None, ge=-1)
    ignore_eos: bool = False
    # llama-server's switch: reuse the KV of a prompt's beginning held from earlier requests
    # (faster; a seeded sampled answer can then differ slightly, see the README)
    cache_prompt: bool = True

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None


class CompletionRequest(_Sampling):
    # A string, a list of strings (one choice each), or token ids (one list, or a list of lists).
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    response_format: Optional[ResponseFormat] = None


# --- responses ----------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def finish_reason(reason: str | None) -> str:
    """The engine's reasons in OpenAI's words: a cancelled sequence (the server is stopping)
    ended on its own terms, not by length."""
    return "length" if reason == "length" else "stop"


def usage(results: list[dict]) -> dict:
    """Usage summed over the choices of one request, with llama-server's ``timings`` of the
    first choice (each choice has its own; the sum of rates means nothing)."""
    prompt = sum(r["n_prompt"] for r in results)
    completion = sum(r["n_generated"] for r in results)
    cached = sum(r["cached_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def timings(r: dict) -> dict:
    """llama-server's per-request timings: prompt tokens actually computed (a copied prefix
    costs nothing) and the time from taking a slot to the first token; generated tokens and the
    time after the first one."""
    return {"prompt_n": r["n_prompt"] - r["cached_tokens"], "prompt_ms": round(r["prompt_ms"], 3),
            "prompt_per_second": round(r["prompt_per_second"], 2),
            "predicted_n": r["n_generated"], "predicted_ms": round(r["predicted_ms"], 3),
            "predicted_per_second": round(r["predicted_per_second"], 2),
            "cache_n": r["cached_tokens"], "ttft_ms": round(r["ttft_ms"], 3)}


def chat_logprobs(entries: list[dict]) -> dict:
    """Chat's ``logprobs``: one object per generated token, with its alternatives."""
    def one(e: dict) -> dict:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e["top_logprobs"]]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """The completions API's column form: tokens, their log-probabilities, the alternatives as
    {token: logprob}, and where each token starts in the choice's text."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}
