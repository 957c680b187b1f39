"""`lm serve`: one checkpoint behind an OpenAI-compatible HTTP API, so curl and the standard clients can use it.

    lm serve --ckpt runs/sft_hh/checkpoints/last.ckpt                     # http://127.0.0.1:8000/v1
    curl 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

    GET  /health                {"status": "ok"}
    GET  /v1/models             the one model; its id is --model_name (default: the checkpoint's file stem)
    POST /v1/chat/completions   messages -> the assistant's reply, in lm.chat's template (SFT checkpoints)
    POST /v1/completions        prompt -> its continuation (pretrained checkpoints)

Both POSTs take max_tokens, temperature, top_p, stop (a string or a list), seed and stream (Server-Sent Events), plus
top_k and repetition_penalty as extensions; what a request leaves out comes from the flags. The `model` field is not
checked. Not supported, and a 400 when asked for: n > 1, logprobs, tools/functions, logit_bias, presence/frequency
penalties, best_of, echo, suffix. A bad request is a 400 `{"error": {"message", "type"}}` and the server goes on.

The engine is lm.generate's, with lm chat's conventions: a reply is at most half the context, the oldest exchanges
are dropped until the conversation fits in the rest, and it ends at <|end|>, EOS or BOS. A completion prompt must
fit in the context (the engine would otherwise cut its beginning off silently); its continuation may run past it.

One model on one device: the threads of the HTTP server parse requests in parallel, but generation happens behind one
lock, so requests queue; there is no batching across requests yet. Each request samples with its own torch.Generator,
seeded by its `seed`, so a request with a seed is reproducible; without one, the seed is drawn from a generator seeded
by --seed, so replies differ from request to request and a restarted server gives the same sequence again.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

from lm.chat import CHAT_TEMPLATE_VERSION, Message, check_messages, fit_history
from lm.errors import LMError
from lm.generate import Finish, check_sampling, stream_text
from lm.model import GPT
from lm.tokenizer import BOS, END, EOS, Tokenizer

# Fields we cannot honour, with the value that asks for nothing: another value is refused rather than ignored.
UNSUPPORTED = {
    "n": 1,
    "best_of": 1,
    "logprobs": False,
    "top_logprobs": 0,
    "echo": False,
    "suffix": "",
    "tools": [],
    "functions": [],
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0,
}


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

    def __init__(self, address, model: GPT, tokenizer: Tokenizer, *, model_name: str, defaults: dict, seed: int):
        super().__init__(address, Handler)
        self.model, self.tokenizer, self.model_name, self.defaults = model, tokenizer, model_name, defaults
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()  # one generation at a time: one model, one device
        self.seeds = random.Random(seed)  # draws the seed of each request that sets none

    # ---- requests -> jobs (an LMError is the client's mistake: a 400) ----

    def chat_job(self, body: dict) -> Job:
        messages = _messages(body.get("messages"))
        job = self._job(body, chat=True)
        budget = self.model.config.block_size - job.sampling["max_new_tokens"]
        _, job.prompt_ids = fit_history(messages, self.tokenizer, budget)
        return job

    def completion_job(self, body: dict) -> Job:
        prompt = _field(body, "prompt", str, "a string", "")
        job = self._job(body, chat=False)
        # An empty prompt starts a new document, as in lm generate.
        job.prompt_ids = self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]
        if len(job.prompt_ids) > self.model.config.block_size:
            raise LMError(
                f"the prompt is {len(job.prompt_ids)} tokens long; the context holds {self.model.config.block_size}"
            )
        return job

    def _job(self, body: dict, *, chat: bool) -> Job:
        for name, neutral in UNSUPPORTED.items():
            if body.get(name) not in (None, neutral):
                raise LMError(f"{name!r} is not supported by lm serve (got {json.dumps(body[name])})")
        d = self.defaults
        max_tokens = _field(body, "max_completion_tokens", int, "an integer", None)  # OpenAI's newer name
        if max_tokens is None:
            max_tokens = _field(body, "max_tokens", int, "an integer", d["max_tokens"])
        if max_tokens < 1:
            raise LMError(f"max_tokens must be at least 1, got {max_tokens}")
        sampling = dict(
            # lm chat's rule: a reply takes at most half the context, the conversation keeps the rest.
            max_new_tokens=min(max_tokens, self.model.config.block_size // 2) if chat else max_tokens,
            temperature=_field(body, "temperature", (int, float), "a number", d["temperature"]),
            top_k=_field(body, "top_k", int, "an integer", d["top_k"]),
            top_p=_field(body, "top_p", (int, float), "a number", d["top_p"]),
            repetition_penalty=_field(body, "repetition_penalty", (int, float), "a number", d["repetition_penalty"]),
        )
        check_sampling(**{k: v for k, v in sampling.items() if k != "max_new_tokens"})
        if chat:  # as lm chat: END closes the turn; BOS/EOS (a new conversation or document) end it too
            sampling["stop_ids"] = tuple(self.tokenizer.token_id(t) for t in (END, EOS, BOS))
        stop = _field(body, "stop", (str, list), "a string or a list of strings", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) and s for s in stop):
            raise LMError(f"'stop' must be a string or a list of non-empty strings, got {json.dumps(stop)}")
        options = _field(body, "stream_options", dict, "an object", {})
        return Job(
            chat=chat,
            prompt_ids=[],
            sampling=sampling,
            stop_strings=stop,
            seed=_field(body, "seed", int, "an integer", None),
            stream=_field(body, "stream", bool, "true or false", False),
            include_usage=bool(options.get("include_usage")),
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
            **job.sampling,
        )
        job.completion_tokens, job.finish_reason = finish.tokens, finish.reason


def _field(body: dict, name: str, types, what: str, default):
    """body[name] when it is set, of one of `types` (a JSON true is no number), else the default."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        raise LMError(f"{name!r} must be {what}, got {json.dumps(value)}")
    return value


def _parse_json(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMError(f"the body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise LMError("the body must be a JSON object")
    return request


def _messages(value) -> list[Message]:
    """OpenAI messages -> lm.chat's: checked, content parts joined, ending with the user's turn."""
    if not isinstance(value, list):
        raise LMError("'messages' must be a list of {role, content} objects")
    messages = []
    for m in value:
        if isinstance(m, dict) and isinstance(m.get("content"), list):  # content parts: [{"type": "text", ...}]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in m["content"]):
                raise LMError("only text content parts are supported")
            m = {**m, "content": "".join(str(p.get("text", "")) for p in m["content"])}
        messages.append(m)
    why = check_messages(messages, need_reply=False)
    if why is not None:
        raise LMError(f"messages: {why}")
    if messages[-1]["role"] != "user":
        raise LMError("messages: the last message must be the user's; the reply is the assistant's")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class Handler(BaseHTTPRequestHandler):
    """One connection: route, answer in JSON or Server-Sent Events, and turn every failure into a JSON error."""

    server: LMServer
    server_version = "lm-serve"

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            model = {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "lm"}
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._send_error(404, f"no such endpoint: GET {path}")

    def do_POST(self):
        path = urlsplit(self.path).path
        make_job = {"/v1/chat/completions": self.server.chat_job, "/v1/completions": self.server.completion_job}
        try:
            body = self._read_body()  # even for a 404: a socket closed on unread data resets, losing the answer
            if path not in make_job:
                return self._send_error(404, f"no such endpoint: POST {path}")
            job = make_job[path](_parse_json(body))
            if job.stream:
                self._stream(job)
            else:
                self._respond(job)
        except LMError as e:
            self._send_error(400, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; the lock is released and the next request goes on
        except Exception:  # a bug: the traceback goes to the server's log, never to the client
            self.log_error("%s", traceback.format_exc())
            self._send_error(500, "internal error (see the server's log)", "server_error")

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            raise LMError("the request needs a Content-Length header")
        return self.rfile.read(length)

    def _respond(self, job: Job) -> None:
        with self.server.lock:
            text = "".join(self.server.generate(job))
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
            return {**envelope, "choices": [{"index": 0, **choice, "finish_reason": finish_reason}]}

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
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception:  # a bug, after the 200 went out: say so in the stream, the traceback goes to the log
                self.log_error("%s", traceback.format_exc())
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

    def _send_json(self, status: int, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send_json(status, {"error": {"message": message, "type": kind}})


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
    p = argparse.ArgumentParser(prog="lm serve", description="Serve a checkpoint over an OpenAI-compatible HTTP API.")
    p.add_argument("--ckpt", required=True, help="path to a .ckpt written by lm fit")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (there is no authentication)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the one taken is printed)")
    p.add_argument("--model_name", default=None, help="the model id clients see (default: the checkpoint's file stem)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    # What a request does not set: lm chat's defaults.
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest reply, in tokens (request: max_tokens)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--repetition_penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=1337, help="seeds the seeds of requests that set none")
    args = p.parse_args(argv)

    from lm.checkpoint import load_for_inference

    # Bad defaults would fail every request as the client's mistake: stop here instead.
    if args.max_new_tokens < 1:
        raise LMError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    check_sampling(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty
    )
    model, tokenizer, info, _ = load_for_inference(args.ckpt, args.device)
    version = info.get("chat_template_version")
    if version is not None and version != CHAT_TEMPLATE_VERSION:
        print(f"warning: {args.ckpt} was trained on chat template v{version}; this is v{CHAT_TEMPLATE_VERSION}")
    defaults = dict(
        max_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )
    name = args.model_name or Path(args.ckpt).stem
    try:
        server = LMServer((args.host, args.port), model, tokenizer, model_name=name, defaults=defaults, seed=args.seed)
    except OSError as e:  # port taken, address not ours, ...
        raise LMError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    print(f"lm serve: model {name!r} at http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)

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
