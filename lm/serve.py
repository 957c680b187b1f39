"""`lm serve`: one checkpoint behind an OpenAI-compatible HTTP API, so curl and the standard clients can use it.

    lm serve --ckpt runs/sft_hh/checkpoints/last.ckpt                     # http://127.0.0.1:8000/v1
    curl 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

    GET  /health                {"status": "ok"} (HEAD: the same status, no body)
    GET  /v1/models             the one model; its id is --model_name (default: the checkpoint's file stem)
    POST /v1/chat/completions   messages -> the assistant's reply, in lm.chat's template (SFT checkpoints)
    POST /v1/completions        prompt -> its continuation (pretrained checkpoints)

With --api_key (or LM_API_KEY in the environment), every request but GET /health must carry `Authorization: Bearer
<key>`, as the OpenAI clients send their api_key; others get a 401 before their body is read (at most 64 KiB of it is
discarded, then the connection closes). /health stays open, for load balancers. A key is ASCII letters, digits and
-._~+/ (an OAuth bearer token's characters). Without a key there is no authentication: keep --host on loopback, or
put the server behind something that checks.

Both POSTs take max_tokens, temperature, top_p, stop (a string or a list), seed and stream (Server-Sent Events), plus
top_k (0: no top-k filter) and repetition_penalty as extensions; what a request leaves out comes from the flags. The
`model` field is not checked, nor are OpenAI's fields that leave the reply as it is (user, metadata, store,
service_tier, ...). Not supported, and a 400 naming the field when asked for: n > 1, logprobs, tools/functions,
logit_bias, presence/frequency penalties, best_of, echo, suffix, response_format other than text, audio, reasoning
and web search, a `prompt` list of more than one prompt (one in a list is read as itself). A field serve does not
know is a 400 too, as in OpenAI's API: ignored, another server's ignore_eos, min_tokens or min_p (or a chat's
`messages` sent to /v1/completions) would give a reply that was not asked for. A field set to null is not set. A
completion's `prompt` may also be token ids of this model's tokenizer, as OpenAI's API takes them (`[15496, 995]`, or
a list of one such list). A bad request is a 400 `{"error": {"message", "type"}}` (plus "param" for a field serve
does not take) and the server goes on.

The engine is lm.generate's, with lm chat's conventions: a reply is at most half the context, the oldest exchanges
are dropped until the conversation fits in the rest, and it ends at <|end|>, EOS, BOS or a role marker, whose text
is never part of it (so a reply sent back as history is accepted). A completion prompt must fit in the context (the
engine would otherwise cut its beginning off silently); its continuation may run past it.

One model on one device: the threads of the HTTP server parse requests in parallel, but generation happens behind one
lock, so requests queue; there is no batching across requests yet. A client that leaves stops its generation (a
stream at its next piece, a plain request within 0.25 s: a client that only half-closes its side after sending, as
`nc -N` does, counts as gone; curl, requests and the OpenAI clients do not do that), and one that stalls for 30 s is
dropped, so neither keeps the others waiting. A request takes at most 4 stop strings of at most 256 characters. A
completion asks for at most --max_tokens_limit tokens (4096).

Each request samples with its own torch.Generator, seeded by its `seed`, so a request with a seed is reproducible;
without one, the seed is drawn from a generator seeded by --seed, so replies differ from request to request and a
restarted server gives the same sequence again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import torch

from lm.chat import (
    Message,
    add_reply_flags,
    check_messages,
    fit_history,
    join_text_parts,
    load_chat_checkpoint,
    reply_stop_ids,
    tidy_messages,
)
from lm.errors import ArgumentParser, LMError
from lm.generate import Finish, check_sampling, stream_text
from lm.model import GPT
from lm.tokenizer import Tokenizer

# The settings a request may give, besides its messages (chat) or prompt (completion).
SETTINGS = (
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed",
    "stream", "stream_options",
)  # fmt: skip
# OpenAI's fields that leave the reply as it is (the model's name, bookkeeping, caching, speed): taken and unused.
NO_EFFECT = (
    "model", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
    "safety_identifier", "prediction",
)  # fmt: skip
# OpenAI's fields we cannot honour, with the values that ask for nothing (none: only null does): another value is
# refused rather than ignored. Any other field is refused too, as OpenAI's API refuses a field it does not know.
UNSUPPORTED = {
    "n": (1,),
    "best_of": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "echo": (False,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none", "auto"),  # without tools, either is a plain reply
    "functions": ([],),
    "function_call": ("none", "auto"),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
}
MAX_BODY_BYTES = 16 * 2**20  # a request body above this is refused (413) before it is read
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 256  # per request (OpenAI allows 4 stop sequences)
GET_ENDPOINTS = ("/health", "/v1/models")  # and /v1/models/<the model's id>
POST_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
REFUSED_BODY_BYTES = 2**16  # of a request refused for its key, this much body is read and dropped, no more
API_KEY = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750's bearer token: what a client can send as it is


@dataclass
class Job:
    """One request, checked and tokenized: everything generation needs, and what it found out."""

    chat: bool  # /v1/chat/completions (else /v1/completions): decides the shape of the response
    prompt_ids: list[int]
    sampling: dict  # stream_text's keyword arguments, except the generator
    stop_strings: list[str]
    seed: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: one more chunk, with the usage, before [DONE]
    completion_tokens: int = 0
    finish_reason: str = "stop"


class LMServer(ThreadingHTTPServer):
    """The HTTP server and what its request threads share: the model, the tokenizer, the defaults and the lock."""

    request_queue_size = 128  # socketserver's 5 resets connections in a burst of parallel requests

    def __init__(
        self,
        address,
        model: GPT,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        defaults: dict,
        seed: int,
        max_tokens_limit: int = 4096,
        api_key: str | None = None,
    ):
        if ":" in address[0]:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        self.api_key_digest = api_key_digest(api_key)  # before binding: a bad key leaves no socket behind
        self.max_tokens_limit = max_tokens_limit  # bounds a completion, which is not held to the context
        super().__init__(address, Handler)
        self.model, self.tokenizer, self.model_name, self.defaults = model, tokenizer, model_name, defaults
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()  # one generation at a time: one model, one device
        self.seeds = random.Random(seed)  # draws the seed of each request that sets none

    # ---- requests -> jobs (an LMError is the client's mistake: a 400) ----

    def chat_job(self, body: dict) -> Job:
        job = self._job(body, chat=True)  # first: a completion's prompt sent here is named as such
        messages = _messages(body.get("messages"))
        budget = self.model.config.block_size - job.sampling["max_new_tokens"]
        _, job.prompt_ids = fit_history(messages, self.tokenizer, budget)
        return job

    def completion_job(self, body: dict) -> Job:
        prompt = body.get("prompt", "")
        # OpenAI's array forms of one prompt: [text], [ids] or ids (a list of texts or of id lists is a batch)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        job = self._job(body, chat=False)
        if _token_ids(prompt):  # a prompt tokenized by the client (lm-evaluation-harness does), this model's ids
            bad = next((i for i in prompt if not 0 <= i < self.tokenizer.vocab_size), None)
            if bad is not None:
                raise LMError(f"prompt: token id {bad} is outside the vocabulary (size {self.tokenizer.vocab_size})")
            job.prompt_ids = list(prompt)
        else:
            what = "a string, a list of token ids, or a list of one of them"
            prompt = _field({"prompt": prompt}, "prompt", str, what, "")
            # An empty prompt starts a new document, as in lm generate.
            job.prompt_ids = self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]
        if len(job.prompt_ids) > self.model.config.block_size:
            raise LMError(
                f"the prompt is {len(job.prompt_ids)} tokens long; the context holds {self.model.config.block_size}"
            )
        return job

    def _job(self, body: dict, *, chat: bool) -> Job:
        _check_fields(body, chat=chat)
        d = self.defaults
        max_tokens = _field(body, "max_completion_tokens", int, "an integer", None)  # OpenAI's newer name
        if max_tokens is None:
            max_tokens = _field(body, "max_tokens", int, "an integer", d["max_tokens"])
        if max_tokens < 1:
            raise LMError(f"max_tokens must be at least 1, got {max_tokens}")
        if not chat and max_tokens > self.max_tokens_limit:  # a chat reply is capped at half the context below
            raise LMError(f"max_tokens {max_tokens} is above this server's limit of {self.max_tokens_limit}")
        sampling = dict(
            # lm chat's rule: a reply takes at most half the context, the conversation keeps the rest.
            max_new_tokens=min(max_tokens, self.model.config.block_size // 2) if chat else max_tokens,
            temperature=_field(body, "temperature", (int, float), "a number", d["temperature"]),
            top_k=_field(body, "top_k", int, "an integer", d["top_k"]),
            top_p=_field(body, "top_p", (int, float), "a number", d["top_p"]),
            repetition_penalty=_field(body, "repetition_penalty", (int, float), "a number", d["repetition_penalty"]),
        )
        check_sampling(**{k: v for k, v in sampling.items() if k != "max_new_tokens"})
        if chat:  # as lm chat
            sampling["stop_ids"] = reply_stop_ids(self.tokenizer)
        stop = _field(body, "stop", (str, list), "a string or a list of strings", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) and s for s in stop):
            raise LMError(f"'stop' must be a string or a list of non-empty strings, got {json.dumps(stop)}")
        # OpenAI's limit of 4, and a length limit: every token is checked against every stop string, under the lock
        if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
            raise LMError(f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
        options = _field(body, "stream_options", dict, "an object", {})
        return Job(
            chat=chat,
            prompt_ids=[],
            sampling=sampling,
            stop_strings=stop,
            seed=_field(body, "seed", int, "an integer", None),
            stream=_field(body, "stream", bool, "true or false", False),
            # a bool, as OpenAI's API checks it: bool("false") was True
            include_usage=_field(options, "include_usage", bool, "true or false", False),
        )

    # ---- generation: call with the lock held ----

    def generate(self, job: Job) -> Iterator[str]:
        """The reply, piece by piece; once exhausted, job.completion_tokens and job.finish_reason are set."""
        seed = job.seed if job.seed is not None else self.seeds.randrange(2**63)
        generator = torch.Generator(self.device).manual_seed(seed % 2**64)  # any JSON integer: torch takes 64 bits
        finish = Finish()
        yield from stream_text(
            self.model,
            self.tokenizer,
            job.prompt_ids,
            stop_strings=job.stop_strings,
            generator=generator,
            finish=finish,
            skip_special=job.chat,  # as lm chat: a reply holds no special token's text
            **job.sampling,
        )
        job.completion_tokens, job.finish_reason = finish.tokens, finish.reason


def api_key_digest(api_key: str | None) -> bytes | None:
    """The SHA-256 of a valid key (None for no key or ""); LMError for a key a client could not send as it is.

    Requests are checked against the digest: digests of equal length compare in constant time, so a guess learns
    nothing, not even the key's length.
    """
    if not api_key:
        return None
    if not API_KEY.fullmatch(api_key):
        raise LMError(
            "--api_key (or LM_API_KEY) must be ASCII letters, digits and -._~+/ (optionally ending in =), which every "
            "client can send in an Authorization header"
        )
    return hashlib.sha256(api_key.encode()).digest()


def _check_fields(body: dict, *, chat: bool) -> None:
    """RequestError naming the first field that asks for what lm serve does not do (a null field asks for nothing).

    Ignoring it would answer another question than the one asked: another server's extension (vLLM's ignore_eos,
    min_tokens, min_p), a chat's messages sent to /v1/completions, OpenAI's n or logprobs.
    """
    for name, value in body.items():
        if value is None or name in SETTINGS or name in NO_EFFECT or name == ("messages" if chat else "prompt"):
            continue
        if name not in UNSUPPORTED:
            if name == "messages":
                hint = " (a conversation goes to /v1/chat/completions)"
            elif name == "prompt":
                hint = " (a prompt to continue goes to /v1/completions)"
            else:
                hint = f"; lm serve takes {', '.join(SETTINGS)}"
            raise RequestError(400, f"unrecognized request argument {name!r}{hint}", param=name)
        # Equal is not enough: 0 == False, and the legacy API's "logprobs": 0 asks for the chosen tokens' logprobs
        asks_nothing = (value == n and isinstance(value, bool) == isinstance(n, bool) for n in UNSUPPORTED[name])
        if not any(asks_nothing):
            raise RequestError(400, f"{name!r} is not supported by lm serve (got {json.dumps(value)})", param=name)


def _field(body: dict, name: str, types, what: str, default):
    """body[name] when it is set, of one of `types` (a JSON true is no number), else the default."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        raise LMError(f"{name!r} must be {what}, got {json.dumps(value)}")
    return value


def _token_ids(value) -> bool:
    """Whether a prompt is a non-empty list of token ids (integers; JSON's true and false are not)."""
    return isinstance(value, list) and bool(value) and all(type(i) is int for i in value)


class RequestError(LMError):
    """A client error with its own HTTP status (411, 413), or about one field (`param` in the error); other LMErrors
    are 400s."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _log_traceback() -> None:
    # Not log_error: http.server escapes its newlines, which would make the traceback one unreadable line.
    sys.stderr.write(traceback.format_exc())


def _parse_json(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, too many digits, too deep a nesting
        raise LMError(f"the body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(request, dict):
        raise LMError("the body must be a JSON object")
    return request


def _messages(value) -> list[Message]:
    """OpenAI messages -> lm.chat's: checked, content parts joined, ending with the user's turn."""
    if not isinstance(value, list):
        raise LMError("'messages' must be a list of {role, content} objects")
    try:
        messages = join_text_parts(value)
    except ValueError as e:
        raise LMError(f"messages: {e}") from None
    messages = tidy_messages(messages)  # "developer" is OpenAI's newer name for "system"; a blank system is left out

    # A reply can be empty or blank (the model ended its turn at once, or wrote only spaces or newlines); sent back as
    # history, it must not be refused.
    def blank_reply(m) -> bool:
        return (
            isinstance(m, dict)
            and m.get("role") == "assistant"
            and isinstance(m.get("content"), str)
            and not (m["content"].strip())
        )

    checked = [{**m, "content": "-"} if blank_reply(m) else m for m in messages]
    why = check_messages(checked, need_reply=False)
    if why is not None:
        raise LMError(f"messages: {why}")
    if messages[-1]["role"] != "user":
        raise LMError("messages: the last message must be the user's; the reply is the assistant's")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class Handler(BaseHTTPRequestHandler):
    """One connection: route, answer in JSON or Server-Sent Events, and turn every failure into a JSON error."""

    server: LMServer
    server_version = "lm-serve"
    # Seconds a socket read or write may block: a client that stops reading a stream (or never sends its body)
    # must not hold the generation lock, or a thread, for ever.
    timeout = 30

    def _authorized(self, path: str) -> bool:
        """True if the request may go on; otherwise a 401 has been sent. Every path needs the key but GET (or HEAD)
        /health.

        Called before a body is read, so a stranger cannot make the server hold 16 MiB, or a thread, for a body.
        """
        if self.server.api_key_digest is None or (self.command in ("GET", "HEAD") and path == "/health"):
            return True
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        # http.server decodes header bytes as Latin-1: encoding back gives the bytes the client sent
        digest = hashlib.sha256(token.strip().encode("latin-1", errors="replace")).digest()
        if scheme.lower() == "bearer" and hmac.compare_digest(digest, self.server.api_key_digest):
            return True
        length = self._content_length()
        # A small body is read, or closing on it could reset the 401 away; one the client holds back until it hears
        # "100 Continue" is not coming, and reading it would wait for the client's timeout
        if length is not None and length <= REFUSED_BODY_BYTES and not self._expects_100():
            self.rfile.read(length)
        self.close_connection = True  # what is left of a larger body is never read
        self._send_error(
            401,
            "missing or wrong API key (Authorization: Bearer <key>)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer", "Connection": "close"},
        )
        return False

    def do_GET(self):
        path = urlsplit(self.path).path
        if not self._authorized(path):
            return
        model = {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "lm"}
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [model]})
        elif self._is_the_model(path):
            self._send_json(200, model)
        else:
            self._no_such_endpoint(path)

    def do_HEAD(self):
        """GET's status and headers without the body: load balancers probe /health with either."""
        self.do_GET()

    def _allowed(self, path: str) -> str | None:
        """The methods an endpoint takes, as a 405's Allow header lists them; None where there is no such endpoint."""
        if path in POST_ENDPOINTS:
            return "POST"
        return "GET, HEAD" if path in GET_ENDPOINTS or self._is_the_model(path) else None

    def _is_the_model(self, path: str) -> bool:
        """Whether `path` is /v1/models/<this server's model id> (percent-encoded or not)."""
        return path.startswith("/v1/models/") and unquote(path.removeprefix("/v1/models/")) == self.server.model_name

    def _method_not_allowed(self):
        """PUT, DELETE, PATCH, OPTIONS: a 405 or a 404, after the key, so that a stranger learns no endpoint list."""
        path = urlsplit(self.path).path
        if self._authorized(path):
            self._no_such_endpoint(path)

    def _no_such_endpoint(self, path: str) -> None:
        """405 for an endpoint called with the wrong method, with the methods it takes (as RFC 9110 asks); else 404."""
        allowed = self._allowed(path)
        if allowed is None:
            self._send_error(404, f"no such endpoint: {self.command} {path}")
            return
        self.close_connection = True  # a body, if any, is never read
        self._send_error(405, f"{self.command} is not supported here; use {allowed}", headers={"Allow": allowed})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (an unknown method: 501; a malformed request line: 400; a header too long: 431)
        in the API's JSON error shape, as every other failure, not as its HTML page; logged as http.server logs them."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        self._send_error(code, message or HTTPStatus(code).phrase)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed

    def do_POST(self):
        path = urlsplit(self.path).path
        make_job = {"/v1/chat/completions": self.server.chat_job, "/v1/completions": self.server.completion_job}
        try:
            if not self._authorized(path):
                return
            body = self._read_body()  # even for a 404: a socket closed on unread data resets, losing the answer
            if path not in make_job:
                return self._no_such_endpoint(path)
            job = make_job[path](_parse_json(body))
            if job.stream:
                self._stream(job)
            else:
                self._respond(job)
        except RequestError as e:
            self._send_error(e.status, str(e), param=e.param)
        except LMError as e:
            self._send_error(400, str(e))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client went away or stalled; the lock is released and the next request goes on
        except Exception:  # a bug: the traceback goes to the server's log, never to the client
            _log_traceback()
            self._send_error(500, "internal error (see the server's log)", "server_error")

    def _content_length(self) -> int | None:
        """The Content-Length header as a number; None when it is missing or not a decimal number."""
        length = self.headers.get("Content-Length", "")
        return int(length) if length.isascii() and length.isdigit() else None  # "²".isdigit(), but int("²") raises

    def _read_body(self) -> bytes:
        length = self._content_length()
        if length is None:
            raise RequestError(411, "the request needs a Content-Length header (chunked bodies are not supported)")
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}")
        if self._expects_100():
            # curl asks for it before a body over 1 MiB and waited a second for it (http.server sends it only to
            # HTTP/1.1 servers' clients): go on at once
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
        body = self.rfile.read(length)
        if len(body) < length:
            raise LMError(f"the body ended after {len(body)} of its {length} bytes")
        return body

    def _expects_100(self) -> bool:
        """Whether the client holds its body back until "100 Continue": never an HTTP/1.0 one (RFC 9110 allows no 1xx
        answer to it)."""
        http_1_1_or_later = self.request_version not in ("HTTP/0.9", "HTTP/1.0")
        return http_1_1_or_later and self.headers.get("Expect", "").lower() == "100-continue"

    def _client_gone(self) -> bool:
        """Whether the client closed its connection: readable with nothing to read (it sends nothing after its body)."""
        # A selector, not select.select, which refuses a socket numbered 1024 or above (a server with many queued
        # clients): that was a 500 after the whole generation.
        with selectors.DefaultSelector() as selector:
            selector.register(self.connection, selectors.EVENT_READ)
            if not selector.select(timeout=0):
                return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, TimeoutError):
            return False
        except OSError:
            return True

    def _respond(self, job: Job) -> None:
        pieces, checked = [], time.monotonic()
        with self.server.lock:
            for piece in self.server.generate(job):
                pieces.append(piece)
                if time.monotonic() - checked > 0.25:  # a client that left must not keep the model busy
                    if self._client_gone():
                        return
                    checked = time.monotonic()
        text = "".join(pieces)
        response = self._envelope(job, "chat.completion" if job.chat else "text_completion")
        message = {"role": "assistant", "content": text}
        choice = {"message": message} if job.chat else {"text": text, "logprobs": None}
        response["choices"] = [{"index": 0, **choice, "finish_reason": job.finish_reason}]
        response["usage"] = _usage(job)
        self._send_json(200, response)

    def _stream(self, job: Job) -> None:
        """Server-Sent Events: one chunk per piece of text, a last one with the finish_reason, then [DONE]."""
        envelope = self._envelope(job, "chat.completion.chunk" if job.chat else "text_completion")

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            choice = {"delta": delta} if job.chat else {"text": delta.get("content", ""), "logprobs": None}
            # With include_usage, OpenAI's other chunks carry "usage": null
            usage = {"usage": None} if job.include_usage else {}
            return {**envelope, "choices": [{"index": 0, **choice, "finish_reason": finish_reason}], **usage}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        with self.server.lock:
            if job.chat:  # as OpenAI's, the first chunk names the role
                self._send_event(chunk({"role": "assistant", "content": ""}))
            try:
                for piece in self.server.generate(job):
                    self._send_event(chunk({"content": piece}))
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                raise
            except Exception:  # a bug, after the 200 went out: say so in the stream, the traceback goes to the log
                _log_traceback()
                return self._send_event(
                    {"error": {"message": "internal error (see the server's log)", "type": "server_error"}}
                )
        self._send_event(chunk({}, job.finish_reason))
        if job.include_usage:
            self._send_event({**envelope, "choices": [], "usage": _usage(job)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _envelope(self, job: Job, kind: str) -> dict:
        prefix = "chatcmpl" if job.chat else "cmpl"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.server.model_name,
        }

    def _send_event(self, data: dict) -> None:
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()  # each piece leaves now, not when a buffer fills

    def _send_json(self, status: int, data: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        """The last thing a failed request writes; a client already gone is no news (and no traceback in the log)."""
        error = (
            {"message": message, "type": kind} | ({"param": param} if param else {}) | ({"code": code} if code else {})
        )
        try:
            self._send_json(status, {"error": error}, headers)
        except OSError:
            self.close_connection = True


def base_url(host: str, port: int) -> str:
    """The API's base URL, as clients take it: an IPv6 address goes in brackets."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _usage(job: Job) -> dict:
    prompt = len(job.prompt_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": job.completion_tokens,
        "total_tokens": prompt + job.completion_tokens,
    }


# ---- lm serve -----------------------------------------------------------------------------------------------------


def serve_command(argv: list[str]) -> None:
    """lm serve: answer OpenAI-style HTTP requests with a checkpoint until Ctrl-C or SIGTERM."""
    p = ArgumentParser(prog="lm serve", description="Serve a checkpoint over an OpenAI-compatible HTTP API.")
    p.add_argument("--ckpt", required=True, help="path to a .ckpt written by lm fit")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument(
        "--api_key",
        default=os.environ.get("LM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every request but GET /health (default: $LM_API_KEY, which keeps "
        "the key out of the process list; unset: no authentication)",
    )
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the one taken is printed)")
    p.add_argument("--model_name", default=None, help="the model id clients see (default: the checkpoint's file stem)")
    # What a request does not set: lm chat's defaults.
    add_reply_flags(
        p,
        max_new_tokens_help="longest reply, in tokens (request: max_tokens)",
        seed_help="seeds the seeds of requests that set none",
    )
    p.add_argument(
        "--max_tokens_limit",
        type=int,
        default=4096,
        help="most tokens one completion may ask for (chat: half the context)",
    )
    args = p.parse_args(argv)

    # Checked before the model loads: socket.bind would raise OverflowError (a traceback) only after that.
    if not 0 <= args.port <= 65535:
        raise LMError(f"--port must be in [0, 65535], got {args.port}")
    api_key_digest(args.api_key)  # a bad key fails here, not after the model has loaded
    # Bad defaults would fail every request as the client's mistake: stop here instead.
    if not 1 <= args.max_new_tokens <= args.max_tokens_limit:
        raise LMError(
            f"--max_new_tokens must be in [1, --max_tokens_limit {args.max_tokens_limit}], got {args.max_new_tokens}"
        )
    model, tokenizer, _ = load_chat_checkpoint(args)
    defaults = dict(
        max_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )
    name = args.model_name or Path(args.ckpt).stem
    try:
        server = LMServer(
            (args.host, args.port),
            model,
            tokenizer,
            model_name=name,
            defaults=defaults,
            seed=args.seed,
            max_tokens_limit=args.max_tokens_limit,
            api_key=args.api_key,
        )
    except OSError as e:  # port taken, address not ours, ...
        raise LMError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    print(f"lm serve: model {name!r} at {base_url(host, port)} (Ctrl-C to stop)", flush=True)
    if server.api_key_digest is None and not _is_loopback(host):
        print(f"lm serve: warning: {host} is reachable from other machines and there is no --api_key", file=sys.stderr)

    def stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM stops the server the way Ctrl-C does

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("lm serve: stopped", flush=True)
    finally:
        server.server_close()  # request threads are daemons: a reply in progress ends with the process
        signal.signal(signal.SIGTERM, previous)
