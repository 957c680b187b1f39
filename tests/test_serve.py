"""`lm serve`: a real server on a free port of 127.0.0.1 in a background thread, spoken to with urllib. Replies equal
the generation engine's for the same prompt and settings; usage, finish_reason, streaming, seeds, errors, concurrency,
and the command itself (one-line errors, SIGTERM)."""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from lm.chat import render_prompt, reply_stop_ids
from lm.checkpoint import load_for_inference
from lm.errors import LMError
from lm.generate import stream_text, stream_tokens
from lm.serve import Handler, LMServer, _is_loopback, base_url
from lm.tokenizer import ASSISTANT, USER, CharTokenizer
from tests.conftest import REPO, cli_env
from tests.test_chat_replies import scripted_model
from tests.test_eval import write_checkpoint
from tests.test_inference_cli import TINY, run

# The server's defaults in these tests: lm chat's, except the longest reply (the context is 32 tokens).
DEFAULTS = dict(max_tokens=8, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1)
HELLO = [{"role": "user", "content": "hello there"}]
# Loopback only, whatever proxy the environment names.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "tiny.ckpt"
    write_checkpoint(path, CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz .,!?\n"]), **TINY)
    return path


@pytest.fixture
def server(ckpt):
    """(base URL, the LMServer) of a server running in a thread; shut down and closed after the test."""
    model, tokenizer, _, _ = load_for_inference(ckpt, "cpu")
    with serving(model, tokenizer) as running:
        yield running


@contextlib.contextmanager
def serving(model, tokenizer, api_key=None, model_name="tiny"):
    """(base URL, the LMServer) of a server of this model running in a thread, for the with block."""
    srv = LMServer(
        ("127.0.0.1", 0),
        model,
        tokenizer,
        model_name=model_name,
        defaults=DEFAULTS,
        seed=0,
        max_tokens_limit=64,
        api_key=api_key,
    )
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)  # quick shutdown
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def call(url: str, body: dict | bytes | None = None, key: str | None = None) -> tuple[int, dict | str]:
    """POST body (JSON, or raw bytes) or GET when there is none, with `Authorization: Bearer key` if a key is given;
    the status and the parsed JSON (an event stream's raw text)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with OPENER.open(request, timeout=60) as response:
            status, kind, text = response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        status, kind, text = e.code, e.headers["Content-Type"], e.read().decode()
    return status, json.loads(text) if kind == "application/json" else text


def events(stream: str) -> list:
    """The `data:` payloads of a Server-Sent Events body, parsed, with the final "[DONE]" kept as a string."""
    blocks = stream.split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1]), stream
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks[:-1]]


def engine(srv: LMServer, prompt_ids, *, max_new_tokens: int, chat: bool = True, seed: int = 0, **overrides):
    """What lm.generate gives for the server's model and defaults: the text and the number of tokens generated."""
    tokenizer = srv.tokenizer
    sampling = {k: v for k, v in DEFAULTS.items() if k != "max_tokens"} | overrides
    sampling |= dict(
        max_new_tokens=max_new_tokens,
        stop_ids=reply_stop_ids(tokenizer) if chat else (tokenizer.eos_id,),
        vocab_size=tokenizer.vocab_size,
    )
    generator = torch.Generator().manual_seed(seed)
    text = "".join(stream_text(srv.model, tokenizer, prompt_ids, generator=generator, skip_special=chat, **sampling))
    tokens = list(stream_tokens(srv.model, prompt_ids, generator=torch.Generator().manual_seed(seed), **sampling))
    return text, len(tokens)


def test_health_and_models(server):
    url, _ = server
    assert call(url + "/health") == (200, {"status": "ok"})
    # a load balancer may probe with HEAD: GET's status and headers, no body (it was a 501 with an HTML page)
    with OPENER.open(urllib.request.Request(url + "/health", method="HEAD"), timeout=60) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "application/json"
        assert int(response.headers["Content-Length"]) == len(b'{"status": "ok"}') and response.read() == b""
    status, models = call(url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]


def test_greedy_chat_completion_is_the_engine_s_reply_with_its_usage(server):
    url, srv = server
    prompt = render_prompt(HELLO, srv.tokenizer)
    expected, n = engine(srv, prompt, max_new_tokens=6, temperature=0)
    assert n == 6  # the reply ran into max_tokens: no stop token came first

    status, reply = call(
        url + "/v1/chat/completions", {"model": "x", "messages": HELLO, "max_tokens": 6, "temperature": 0}
    )
    assert status == 200 and reply["object"] == "chat.completion" and reply["model"] == "tiny"
    assert reply["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": expected}, "finish_reason": "length"}
    ]
    assert reply["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 6, "total_tokens": len(prompt) + 6}


def test_a_developer_message_is_a_system_message(server):
    """OpenAI's newer name for the system role was refused ("unknown role 'developer'")."""
    url, _ = server

    def reply(role):
        body = {"messages": [{"role": role, "content": "be brief"}, *HELLO], "max_tokens": 6, "temperature": 0}
        status, answer = call(url + "/v1/chat/completions", body)
        assert status == 200, answer
        return answer["choices"][0]["message"]["content"], answer["usage"]

    assert reply("developer") == reply("system")


def test_a_stop_string_ends_the_reply_and_counts_the_tokens_generated(server):
    url, srv = server
    prompt = render_prompt(HELLO, srv.tokenizer)
    full, _ = engine(srv, prompt, max_new_tokens=8, temperature=0)
    stop = full[2:4]  # generation goes on until the stop string is complete, which the reply leaves out
    cut = full.index(stop)
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "stop": [stop]}
    status, reply = call(url + "/v1/chat/completions", body)
    assert status == 200
    assert reply["choices"][0]["message"]["content"] == full[:cut]
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == cut + len(stop) < 8


def test_streaming_sends_the_same_reply_in_chunks_then_done(server):
    url, _ = server
    body = {"messages": HELLO, "max_tokens": 6, "temperature": 0}
    _, whole = call(url + "/v1/chat/completions", body)
    status, stream = call(
        url + "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert status == 200
    *chunks, usage, done = events(stream)
    assert done == "[DONE]"
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" in c and c["usage"] is None for c in chunks)  # as OpenAI's, with include_usage
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert len([p for p in pieces if p]) > 1  # streamed, not sent whole
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_completion_continues_a_plain_prompt(server):
    url, srv = server
    expected, _ = engine(srv, srv.tokenizer.encode("to be or"), max_new_tokens=5, chat=False, temperature=0)
    body = {"prompt": "to be or", "max_tokens": 5, "temperature": 0}
    status, reply = call(url + "/v1/completions", body)
    assert status == 200 and reply["object"] == "text_completion"
    assert reply["choices"][0]["text"] == expected and reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}
    _, stream = call(url + "/v1/completions", {**body, "stream": True})
    *chunks, done = events(stream)
    assert done == "[DONE]" and "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert not any("usage" in c for c in chunks)  # no include_usage: no usage key, as OpenAI's


def test_a_seed_makes_sampling_reproducible(server):
    """A request's seed seeds its own generator: the reply is the engine's with that seed, every time."""
    url, srv = server
    prompt = render_prompt(HELLO, srv.tokenizer)

    def sample(**seed) -> dict:
        body = {"messages": HELLO, "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, **seed}
        return call(url + "/v1/chat/completions", body)[1]["choices"][0]

    replies = {}
    for seed in range(4):
        expected, n = engine(srv, prompt, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=seed)
        replies[expected] = "length" if n == 16 else "stop"
        reply = {"index": 0, "message": {"role": "assistant", "content": expected}, "finish_reason": replies[expected]}
        assert sample(seed=seed) == sample(seed=seed) == reply
    assert sample(seed=-1) == sample(seed=2**64 - 1) != sample(seed=2**70)  # any integer, taken modulo 2**64
    assert len(replies) > 1 and "stop" in replies.values()  # the seed matters; some replies end at <|end|>/EOS/BOS
    assert len({sample()["message"]["content"] for _ in range(4)}) > 1  # without a seed, each request draws its own


BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"messages": [', "not valid JSON"),
    ("/v1/chat/completions", {"messages": HELLO, "top_p": -0.1}, "top_p must be in [0, 1]"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, "'temperature' must be a number"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 0}, "max_tokens must be at least 1"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 2}, "'n' is not supported"),
    ("/v1/completions", {"prompt": "ab", "logprobs": 0}, "'logprobs' is not supported"),  # 0 == False, asks for some
    ("/v1/chat/completions", {"messages": []}, "messages: no messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 40}]}, "the message is 44 tokens long"),
    ("/v1/completions", {"prompt": "a" * 33}, "the prompt is 33 tokens long"),
    ("/v1/completions", {"prompt": "ab", "max_tokens": 10**9}, "above this server's limit of 64"),
    ("/v1/chat/completions", {"messages": [{"role": ["user"], "content": "hi"}]}, "has unknown role ['user']"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "content is not a string"),
    ("/v1/chat/completions", {"messages": HELLO, "top_k": -1}, "top_k must be at least 0 (0 = no top-k filter)"),
    ("/v1/chat/completions", b"[" * 100_000, "not valid JSON"),  # too deep for the parser
    ("/v1/chat/completions", b'{"seed": ' + b"9" * 5000 + b"}", "not valid JSON"),  # too many digits for int()
    ("/v1/chat/completions", {"messages": HELLO, "response_format": {"type": "json_object"}}, "is not supported"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]},
        "messages: message 0: only text content parts",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "only text content"),
    # 20 prompt tokens fit the context of 32 only without the reply's 16: the history must leave the reply its room
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a" * 16}], "max_tokens": 16},
        "the message is 20 tokens long; the context leaves room for 16",
    ),
    ("/v1/chat/completions", {"messages": HELLO, "stop": list("abcde")}, "'stop' takes at most 4 strings"),
    ("/v1/chat/completions", {"messages": HELLO, "stop": [""]}, 'a list of non-empty strings, got [""]'),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": True}, "'temperature' must be a number, got true"),
    (
        "/v1/chat/completions",
        {"messages": HELLO, "stream": True, "stream_options": {"include_usage": "false"}},
        "'include_usage' must be true or false, got \"false\"",
    ),
]


@pytest.mark.parametrize(("path", "body", "message"), BAD_REQUESTS)
def test_bad_requests_are_400s_and_the_server_goes_on(server, path, body, message):
    url, _ = server
    status, reply = call(url + path, body)
    assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    assert message in reply["error"]["message"]
    assert call(url + "/v1/completions", {"prompt": "ab", "max_tokens": 2})[0] == 200


def test_requests_at_the_limits_are_accepted(server):
    """Each limit is inclusive: a prompt that fills the context, the server's longest completion, OpenAI's four stop
    strings, a chat prompt that leaves the reply exactly its room."""
    url, _ = server
    status, reply = call(url + "/v1/completions", {"prompt": "a" * 32, "max_tokens": 2})
    assert status == 200 and reply["usage"]["prompt_tokens"] == 32
    status, reply = call(url + "/v1/completions", {"prompt": "ab", "max_tokens": 64, "stop": list("wxyz")})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 64
    fits = {"messages": [{"role": "user", "content": "a" * 12}], "max_tokens": 16}  # 16 prompt tokens + 16
    status, reply = call(url + "/v1/chat/completions", fits)
    assert status == 200 and reply["usage"]["prompt_tokens"] == 16


def test_max_completion_tokens_is_openai_s_newer_name_for_max_tokens_and_wins(server):
    """OpenAI's newer clients send max_completion_tokens (some with the legacy max_tokens too): it bounds the reply."""
    url, srv = server
    expected, n = engine(srv, srv.tokenizer.encode("to be or"), max_new_tokens=3, chat=False, temperature=0)
    assert n == 3  # no EOS first: the length is max_completion_tokens'
    body = {"prompt": "to be or", "max_completion_tokens": 3, "max_tokens": 5, "temperature": 0}
    status, reply = call(url + "/v1/completions", body)
    assert status == 200 and reply["choices"][0]["text"] == expected
    assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        # other servers' extensions: each changes the reply, and was ignored without a word
        ("/v1/completions", {"prompt": "ab", "ignore_eos": True}, "ignore_eos", "lm serve takes max_tokens, "),
        ("/v1/completions", {"prompt": "ab", "min_tokens": 4}, "min_tokens", "unrecognized request argument"),
        ("/v1/chat/completions", {"messages": HELLO, "min_p": 0.1}, "min_p", "unrecognized request argument"),
        # the other endpoint's input: a conversation continued as an empty prompt
        ("/v1/completions", {"messages": HELLO}, "messages", "(a conversation goes to /v1/chat/completions)"),
        ("/v1/chat/completions", {"prompt": "ab"}, "prompt", "(a prompt to continue goes to /v1/completions)"),
        # OpenAI's own fields, asking for what serve does not do
        ("/v1/chat/completions", {"messages": HELLO, "tool_choice": "required"}, "tool_choice", "not supported"),
        ("/v1/chat/completions", {"messages": HELLO, "modalities": ["text", "audio"]}, "modalities", "not supported"),
        ("/v1/chat/completions", {"messages": HELLO, "reasoning_effort": "high"}, "reasoning_effort", "not supported"),
        ("/v1/chat/completions", {"messages": HELLO, "presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ("/v1/completions", {"prompt": "ab", "n": 2}, "n", "'n' is not supported by lm serve (got 2)"),
    ],
)  # fmt: skip
def test_a_field_serve_does_not_honour_is_a_400_naming_it(server, path, body, param, message):
    """OpenAI's API refuses an argument it does not know; serve ignored any it did not know, so a client asking for
    at least 4 tokens, or for a chat reply at the completions endpoint, got a reply it did not ask for."""
    url, _ = server
    status, reply = call(url + path, body)
    assert status == 400 and reply["error"]["param"] == param and message in reply["error"]["message"], reply


def test_fields_that_ask_for_nothing_serve_does_not_do_are_accepted(server):
    """What clients send with their defaults: null for anything, OpenAI's neutral values, and the fields that leave
    the reply as it is; the reply is the one without them."""
    url, _ = server
    plain = {"messages": HELLO, "max_tokens": 6, "seed": 3}
    neutral = {
        "model": "gpt-4o",
        "n": 1,
        "logprobs": False,
        "top_logprobs": 0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0,
        "logit_bias": {},
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "user": "u1",
        "metadata": {"run": "x"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "stream_options": None,
        "audio": None,
        "ignore_eos": None,
    }
    (status, reply), (_, expected) = (call(url + "/v1/chat/completions", b) for b in (plain | neutral, plain))
    assert status == 200 and reply["choices"] == expected["choices"] and reply["usage"] == expected["usage"]


def raw(url: str, request: bytes, *, half_close: bool = True) -> bytes:
    """Send raw bytes (for what urllib will not send) and read the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_bodies_with_a_wrong_length_are_refused_before_generation(server):
    url, _ = server
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    body = b'{"prompt": "ab", "max_tokens": 2}'
    assert raw(url, head + b"\r\n" + body).startswith(b"HTTP/1.0 411")  # no Content-Length
    # "\xb2" is "²" to http.server, which str.isdigit() takes for a digit and int() refuses: it was a 500
    assert raw(url, head + b"Content-Length: \xb2\r\n\r\n" + body).startswith(b"HTTP/1.0 411")
    assert raw(url, head + b"Content-Length: 99999999999\r\n\r\n").startswith(b"HTTP/1.0 413")  # not read at all
    short = raw(url, head + b"Content-Length: 1000\r\n\r\n" + body)  # the client sent less and closed
    assert short.startswith(b"HTTP/1.0 400") and f"the body ended after {len(body)} of its 1000 bytes".encode() in short
    assert call(url + "/v1/completions", {"prompt": "ab", "max_tokens": 2})[0] == 200


def test_text_content_parts_are_the_joined_text(server):
    url, _ = server
    content = HELLO[0]["content"]
    parts = [{"type": "text", "text": content[:5]}, {"type": "text", "text": content[5:]}]
    request = {"max_tokens": 4, "temperature": 0}
    status, joined = call(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}], **request})
    _, plain = call(url + "/v1/chat/completions", {"messages": HELLO, **request})
    assert status == 200 and joined["choices"] == plain["choices"] and joined["usage"] == plain["usage"]


def test_a_reply_sent_back_as_history_is_accepted_even_when_empty(server):
    """The model may end its turn at once; the client then sends the empty reply back with the next message."""
    url, _ = server
    history = [*HELLO, {"role": "assistant", "content": ""}, {"role": "user", "content": "and now"}]
    status, reply = call(url + "/v1/chat/completions", {"messages": history, "max_tokens": 2})
    assert status == 200 and reply["object"] == "chat.completion"


@pytest.mark.parametrize("blank", [" ", "\n", " \n "])
def test_a_blank_reply_sent_back_as_history_is_accepted(server, blank):
    """An undertrained model may reply with only spaces or newlines; the server returns it, the client sends it back."""
    url, _ = server
    history = [*HELLO, {"role": "assistant", "content": blank}, {"role": "user", "content": "and now"}]
    assert call(url + "/v1/chat/completions", {"messages": history, "max_tokens": 2})[0] == 200
    blank_user = [{"role": "user", "content": blank}]
    assert call(url + "/v1/chat/completions", {"messages": blank_user})[0] == 400  # the user's turn still needs text


def test_a_reply_ends_at_a_role_marker_and_can_be_sent_back(server):
    """An undertrained model writes the user's turn itself: the reply stops there, holding no "<|user|>" (which the
    char tokenizer cannot encode as text: the reply sent back as history was a 400)."""
    _, srv = server
    model = scripted_model(srv.tokenizer, {ASSISTANT: "o", "o": "k", "k": USER, USER: "h"})
    with serving(model, srv.tokenizer) as (url, _):
        status, reply = call(url + "/v1/chat/completions", {"messages": HELLO, "temperature": 0})
        assert status == 200 and reply["choices"][0]["message"]["content"] == "ok"
        assert reply["choices"][0]["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] == 2
        history = [*HELLO, reply["choices"][0]["message"], {"role": "user", "content": "and now"}]
        assert call(url + "/v1/chat/completions", {"messages": history, "temperature": 0})[0] == 200


def test_top_k_zero_filters_nothing(server):
    url, srv = server
    expected, _ = engine(srv, render_prompt(HELLO, srv.tokenizer), max_new_tokens=8, temperature=1.0, top_k=None)
    status, reply = call(url + "/v1/chat/completions", {"messages": HELLO, "temperature": 1.0, "top_k": 0, "seed": 0})
    assert status == 200 and reply["choices"][0]["message"]["content"] == expected


def test_a_chat_reply_is_capped_at_half_the_context_and_a_tiny_temperature_is_greedy(server):
    url, srv = server
    prompt = render_prompt(HELLO, srv.tokenizer)
    greedy, _ = engine(srv, prompt, max_new_tokens=16, temperature=0)
    body = {"messages": HELLO, "max_tokens": 10**6, "temperature": 1e-50}
    status, reply = call(url + "/v1/chat/completions", body)
    assert status == 200 and reply["usage"]["completion_tokens"] <= srv.model.config.block_size // 2 == 16
    assert reply["choices"][0]["message"]["content"] == greedy


def test_a_model_id_with_spaces_or_accents_is_found_percent_encoded(server):
    _, srv = server
    for name, path in (("sft run", "sft%20run"), ("modèle", "mod%C3%A8le")):
        with serving(srv.model, srv.tokenizer, model_name=name) as (url, _):
            assert call(url + "/v1/models")[1]["data"][0]["id"] == name
            assert call(url + f"/v1/models/{path}") == (
                200,
                {"id": name, "object": "model", "created": 0, "owned_by": "lm"},
            )


def test_a_prompt_given_as_a_list_of_one_is_that_prompt(server):
    url, _ = server
    body = {"max_tokens": 4, "temperature": 0}
    as_string = call(url + "/v1/completions", {**body, "prompt": "to be"})
    as_list = call(url + "/v1/completions", {**body, "prompt": ["to be"]})
    assert as_list[0] == 200 and as_list[1]["choices"] == as_string[1]["choices"]
    status, error = call(url + "/v1/completions", {**body, "prompt": ["to be", "or not"]})
    assert status == 400 and "or a list of one of them" in error["error"]["message"]


def test_a_prompt_given_as_token_ids_is_those_ids(server):
    """OpenAI's API takes a prompt as token ids (lm-evaluation-harness sends them so): it was refused, not a string."""
    url, srv = server
    body = {"max_tokens": 4, "temperature": 0}
    as_string = call(url + "/v1/completions", {**body, "prompt": "to be"})
    ids = srv.tokenizer.encode("to be")
    for prompt in (ids, [ids]):
        status, reply = call(url + "/v1/completions", {**body, "prompt": prompt})
        assert status == 200 and reply["choices"] == as_string[1]["choices"]
        assert reply["usage"] == as_string[1]["usage"]
    for prompt, message in [
        ([1, srv.tokenizer.vocab_size], f"token id {srv.tokenizer.vocab_size} is outside the vocabulary"),
        ([1, -2], "token id -2 is outside"),
        ([1, 2.5], "a list of token ids"),
        ([True], "a list of token ids"),
        ([ids, ids], "a list of token ids"),  # two prompts: a batch
    ]:
        status, error = call(url + "/v1/completions", {**body, "prompt": prompt})
        assert status == 400 and message in error["error"]["message"], (prompt, error)


def test_the_client_check_works_on_sockets_numbered_above_1024():
    """select.select refuses descriptors >= 1024: a server with many queued clients answered 500 after generating."""
    import os
    import resource
    import types

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1200, hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    ours, peer = socket.socketpair()
    try:
        assert ours.fileno() >= 1024
        handler = types.SimpleNamespace(connection=ours)
        assert Handler._client_gone(handler) is False  # connected, nothing sent
        peer.close()
        assert Handler._client_gone(handler) is True
    finally:
        ours.close()
        peer.close()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_banner_s_url_brackets_an_ipv6_address():
    assert base_url("::1", 8000) == "http://[::1]:8000/v1"
    assert base_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/v1"


def test_models_by_id_and_other_methods(server):
    url, _ = server
    assert call(url + "/v1/models/tiny")[1]["id"] == "tiny"
    assert call(url + "/v1/models/other")[0] == 404
    answer = raw(url, b"DELETE /v1/models/tiny HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 405") and b'"invalid_request_error"' in answer


@pytest.mark.parametrize(
    ("request_line", "status", "allow"),
    [
        (b"PUT /v1/models", 405, b"GET, HEAD"),
        (b"GET /v1/chat/completions", 405, b"POST"),  # was a 404: the endpoint is there
        (b"POST /v1/models", 405, b"GET, HEAD"),
        (b"DELETE /v1/completions", 405, b"POST"),
        (b"POST /v1/models/tiny", 405, b"GET, HEAD"),  # the model by its id
        (b"PUT /v1/models/tiny", 405, b"GET, HEAD"),
        (b"PUT /nope", 404, None),  # no such endpoint, whatever the method
        (b"FOO /v1/models", 501, None),  # was http.server's HTML page
        (b"GET /no such path", 400, None),  # a malformed request line: likewise
    ],
)  # fmt: skip
def test_a_wrong_method_is_a_405_naming_the_allowed_ones_and_every_refusal_is_json(
    server, capfd, request_line, status, allow
):
    """RFC 9110 asks a 405 for an endpoint called with the wrong method, with the methods it takes in `Allow`."""
    url, _ = server
    answer = raw(url, request_line + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    if status in (400, 501):  # http.server's own refusals keep their line in the server's log
        assert f"code {status}, message " in capfd.readouterr().err
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 %d" % status), answer
    assert (f"Allow: {allow.decode()}".encode() in head.split(b"\r\n")) if allow else b"Allow:" not in head
    assert b"Content-Type: application/json" in head and json.loads(body)["error"]["message"]
    assert call(url + "/health")[0] == 200


def test_a_client_that_expects_100_continue_gets_it_at_once(server):
    """curl sends `Expect: 100-continue` before a body over 1 MiB and holds the body back: http.server answers it only
    in HTTP/1.1 mode, so every such request waited a second for curl to give up and send it anyway."""
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "ab", "max_tokens": 2}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body))
        sock.settimeout(5)  # the body is sent only once the server says to go on, as curl does
        assert sock.recv(100) == b"HTTP/1.0 100 Continue\r\n\r\n"
        sock.sendall(body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 200") and json.loads(answer.partition(b"\r\n\r\n")[2])["choices"]
    too_big = head + b"Content-Length: 99999999999\r\n\r\n"  # refused before the client sends a byte of it
    assert raw(url, too_big).startswith(b"HTTP/1.0 413")
    # never to an HTTP/1.0 client, which may take a 100 for the answer (RFC 9110)
    old_client = head.replace(b"HTTP/1.1", b"HTTP/1.0") + b"Content-Length: %d\r\n\r\n" % len(body) + body
    assert raw(url, old_client).startswith(b"HTTP/1.0 200 OK")


@pytest.mark.parametrize("client", ["leaves", "leaves a stream", "stops reading a stream"])
def test_a_client_that_leaves_or_stalls_frees_the_model_for_the_next_request(server, monkeypatch, client):
    """An endless generation for a client that disconnects, or stops reading, must not hold the lock for ever."""
    url, srv = server
    assert 0 < Handler.timeout <= 60  # a socket timeout is set (None would block for ever)
    monkeypatch.setattr(Handler, "timeout", 1)  # shorter here, to keep the test short
    generate, started = srv.generate, threading.Event()

    def endless(job):
        started.set()
        while True:
            if client == "stops reading a stream":
                yield "x" * 65536  # fills the socket's buffers at once
            else:
                time.sleep(0.01)
                yield "x"

    srv.generate = endless
    body = json.dumps({"prompt": "ab", "stream": client != "leaves"}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with socket.create_connection(url.removeprefix("http://").split(":"), timeout=30) as sock:
        sock.sendall(head + body)
        assert started.wait(10)
        if client == "stops reading a stream":  # connected, reading nothing
            deadline = time.monotonic() + 10
            while srv.lock.locked() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not srv.lock.locked()
    deadline = time.monotonic() + 10
    while srv.lock.locked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not srv.lock.locked()
    srv.generate = generate
    assert call(url + "/v1/completions", {"prompt": "ab", "max_tokens": 2})[0] == 200


def test_a_bug_is_a_500_or_an_error_event_and_the_traceback_stays_in_the_server_log(server, capfd):
    url, srv = server
    generate = srv.generate

    def broken(job):
        yield "a"
        raise RuntimeError("a bug in generation")

    srv.generate = broken
    status, reply = call(url + "/v1/completions", {"prompt": "ab"})
    assert status == 500 and reply["error"]["type"] == "server_error" and "bug" not in reply["error"]["message"]
    status, stream = call(url + "/v1/completions", {"prompt": "ab", "stream": True})
    *_, last = events(stream)  # the 200 went out before the bug: the stream ends with an error event
    assert status == 200 and last == {
        "error": {"message": "internal error (see the server's log)", "type": "server_error"}
    }
    log = capfd.readouterr().err
    assert log.count("RuntimeError: a bug in generation") == 2 and "Traceback (most recent call last):\n" in log
    srv.generate = generate
    assert call(url + "/v1/completions", {"prompt": "ab", "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("body", [None, {"prompt": "ab"}])
def test_unknown_paths_are_404s(server, body):
    url, _ = server
    status, reply = call(url + "/v1/nothing", body)
    assert status == 404 and reply["error"]["type"] == "invalid_request_error"
    assert call(url + "/health")[0] == 200


def test_concurrent_requests_queue_and_each_get_their_own_reply(server):
    """Generation is serialized behind the server's lock: requests wait for it, then each gets what it would alone."""
    url, srv = server
    bodies = [
        {"messages": HELLO, "temperature": 1.0, "seed": 1},
        {"prompt": "to be", "temperature": 0},
        {"prompt": "or not", "temperature": 0, "stream": True},
    ]
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/completions"]

    def reply(i: int):
        answer = call(url + paths[i], bodies[i])[1]
        return answer if isinstance(answer, str) else answer["choices"][0]  # a stream's text, with its ids

    alone = [reply(i) for i in range(3)]
    together: list = [None] * 3

    def request(i: int) -> None:
        together[i] = reply(i)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
    with srv.lock:  # as if a long generation were running
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert together == [None] * 3 and all(t.is_alive() for t in threads)  # queued, not failed, streams too
    for t in threads:
        t.join(timeout=60)

    def text(answer) -> str:  # the ids and times of a stream differ from run to run; its text must not
        return "".join(c["choices"][0]["text"] for c in events(answer)[:-1]) if isinstance(answer, str) else answer

    assert [text(a) for a in together] == [text(a) for a in alone] and text(alone[2])


def test_with_an_api_key_every_request_but_health_needs_it(ckpt):
    model, tokenizer, _, _ = load_for_inference(ckpt, "cpu")
    with serving(model, tokenizer, api_key="s3cret") as (base, _):
        assert call(base + "/health") == (200, {"status": "ok"})  # for load balancers
        head = urllib.request.Request(base + "/health", method="HEAD")
        assert OPENER.open(head, timeout=60).status == 200  # HEAD too
        chat = {"messages": HELLO, "max_tokens": 2}
        for url, body, key in [
            ("/v1/models", None, None),
            ("/v1/chat/completions", chat, None),
            ("/v1/chat/completions", chat, "s3cre"),  # a prefix of the key is no key
            ("/v1/completions", {"prompt": "ab"}, "wrong"),
            ("/v1/nowhere", {}, None),  # no endpoint list for strangers
            ("//v1/models", None, None),
            ("/V1/models", None, None),
            ("/health", {}, None),  # only GET /health is open
        ]:
            status, reply = call(base + url, body, key)
            assert status == 401 and reply["error"]["code"] == "invalid_api_key", (url, key)
        assert call(base + "/v1/models", key="s3cret")[1]["data"][0]["id"] == "tiny"
        status, reply = call(base + "/v1/chat/completions", chat, "s3cret")
        assert status == 200 and reply["usage"]["completion_tokens"] <= 2
        with pytest.raises(urllib.error.HTTPError) as refused:  # a 401 names the scheme it wants
            OPENER.open(urllib.request.Request(base + "/v1/models"), timeout=60)
        assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"] == "Bearer"
        # The key is checked before the body is read: a stranger's 16 MiB promise gets a 401 at once, not a 413 or
        # a thread waiting for the bytes; the scheme's name is not case-sensitive.
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
        assert raw(base, head + b"Content-Length: 16777216\r\n\r\n", half_close=False).startswith(b"HTTP/1.0 401")
        # A small body held back for "100 Continue": waiting to read it waited for the client's own timeout
        waits = head + b"Expect: 100-continue\r\nContent-Length: 100\r\n\r\n"
        start = time.perf_counter()
        assert raw(base, waits, half_close=False).startswith(b"HTTP/1.0 401") and time.perf_counter() - start < 5
        body = b'{"prompt": "ab", "max_tokens": 2}'
        length = f"Content-Length: {len(body)}\r\n".encode()
        assert raw(base, head + b"Authorization: bearer s3cret\r\n" + length + b"\r\n" + body).startswith(
            b"HTTP/1.0 200"
        )


@pytest.mark.parametrize("method", [b"PUT", b"DELETE", b"PATCH", b"OPTIONS"])
def test_with_an_api_key_other_methods_need_it_too(ckpt, method):
    """They were answered before the key was checked: a 405 naming the endpoint's methods, or a 404, gave a stranger
    the endpoint list that a GET or a POST keeps behind the 401."""
    model, tokenizer, _, _ = load_for_inference(ckpt, "cpu")
    with serving(model, tokenizer, api_key="s3cret") as (base, _):
        for path in [b"/v1/models", b"/v1/chat/completions", b"/v1/nowhere"]:
            answer = raw(base, method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 401") and b"Allow:" not in head, answer
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
        with_key = method + b" /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n"
        assert raw(base, with_key).startswith(b"HTTP/1.0 405")


@pytest.mark.parametrize("scheme", ["Basic", "Token", ""])
def test_the_right_key_under_another_scheme_than_bearer_is_refused(ckpt, scheme):
    """The key goes in `Authorization: Bearer <key>`; the same key sent as Basic credentials (or with no scheme) is
    not what the server asks for."""
    model, tokenizer, _, _ = load_for_inference(ckpt, "cpu")
    with serving(model, tokenizer, api_key="s3cret") as (base, _):
        header = f"{scheme} s3cret".strip()
        request = urllib.request.Request(base + "/v1/models", headers={"Authorization": header})
        with pytest.raises(urllib.error.HTTPError) as refused:
            OPENER.open(request, timeout=60)
        assert refused.value.code == 401
        assert json.loads(refused.value.read())["error"]["code"] == "invalid_api_key"
        assert call(base + "/v1/models", key="s3cret")[0] == 200


@pytest.mark.parametrize("key", ["cl\u00e9", "two words", "k\u20ac", "abc "])
def test_a_key_a_client_cannot_send_as_it_is_is_refused(ckpt, key):
    model, tokenizer, _, _ = load_for_inference(ckpt, "cpu")
    with pytest.raises(LMError, match="must be ASCII letters"):
        LMServer(("127.0.0.1", 0), model, tokenizer, model_name="t", defaults=DEFAULTS, seed=0, api_key=key)
    with serving(model, tokenizer, api_key="") as (base, _):  # an empty key is no key, not a key nobody can send
        assert call(base + "/v1/models")[0] == 200


@pytest.mark.parametrize(
    ("host", "loopback"), [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("0.0.0.0", False), ("::", False)]
)
def test_loopback_hosts_are_told_from_reachable_ones(host, loopback):
    assert _is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--ckpt", "missing.ckpt"], "error: missing.ckpt: checkpoint not found"),
        (["--ckpt", "missing.ckpt", "--top_p", "1.1"], "error: top_p must be in [0, 1]"),
        # Before the checkpoint loads: socket.bind raised OverflowError (a traceback) once the model was loaded.
        (["--ckpt", "missing.ckpt", "--port", "70000"], "error: --port must be in [0, 65535], got 70000"),
        (["--ckpt", "missing.ckpt", "--port", "-1"], "error: --port must be in [0, 65535], got -1"),
        (["--ckpt", "missing.ckpt", "--api_key", "cl\u00e9"], "error: --api_key (or LM_API_KEY) must be ASCII"),
    ],
)
def test_serve_command_reports_user_errors_in_one_line(capsys, argv, error):
    code, out, err = run(capsys, "serve", *argv)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(error)


@pytest.mark.slow  # the `lm` command takes seconds to import Lightning
def test_serve_command_answers_then_stops_on_sigterm(ckpt):
    process = subprocess.Popen(
        [sys.executable, "-m", "lm", "serve", "--ckpt", str(ckpt), "--port", "0", "--device", "cpu"],
        cwd=REPO,
        env=cli_env(LM_API_KEY="from-the-env"),  # the key's default: not on the command line
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = process.stdout.readline()  # lm serve: model 'tiny' at http://127.0.0.1:PORT/v1 (Ctrl-C to stop)
        base = banner.split(" at ")[1].split()[0]
        assert base.startswith("http://127.0.0.1:") and not base.endswith(":0/v1")
        assert call(base + "/chat/completions", {"messages": HELLO, "max_tokens": 3})[0] == 401
        status, reply = call(base + "/chat/completions", {"messages": HELLO, "max_tokens": 3}, "from-the-env")
        assert status == 200 and reply["model"] == "tiny" and reply["usage"]["completion_tokens"] <= 3
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()  # a no-op once it has exited
    assert process.returncode == 0, err
    assert "lm serve: stopped" in out
