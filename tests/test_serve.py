"""`lm serve`: a real server on a free port of 127.0.0.1 in a background thread, spoken to with urllib. Replies equal
the generation engine's for the same prompt and settings; usage, finish_reason, streaming, seeds, errors, concurrency,
and the command itself (one-line errors, SIGTERM)."""

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from lm.chat import render_prompt
from lm.checkpoint import load_for_inference
from lm.generate import stream_text, stream_tokens
from lm.serve import LMServer
from lm.tokenizer import BOS, END, EOS, CharTokenizer
from tests.conftest import REPO, cli_env
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
    srv = LMServer(("127.0.0.1", 0), model, tokenizer, model_name="tiny", defaults=DEFAULTS, seed=0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)  # quick shutdown
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def call(url: str, body: dict | bytes | None = None) -> tuple[int, dict | str]:
    """POST body (JSON, or raw bytes) or GET when there is none; the status and the parsed JSON (an event stream's
    raw text)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
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
    stops = (END, EOS, BOS) if chat else (EOS,)
    sampling = {k: v for k, v in DEFAULTS.items() if k != "max_tokens"} | overrides
    sampling |= dict(
        max_new_tokens=max_new_tokens,
        stop_ids=tuple(tokenizer.token_id(t) for t in stops),
        vocab_size=tokenizer.vocab_size,
    )
    text = "".join(
        stream_text(srv.model, tokenizer, prompt_ids, generator=torch.Generator().manual_seed(seed), **sampling)
    )
    tokens = list(stream_tokens(srv.model, prompt_ids, generator=torch.Generator().manual_seed(seed), **sampling))
    return text, len(tokens)


def test_health_and_models(server):
    url, _ = server
    assert call(url + "/health") == (200, {"status": "ok"})
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
    ("/v1/chat/completions", {"messages": HELLO, "top_p": 0}, "top_p must be in (0, 1]"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, "'temperature' must be a number"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 0}, "max_tokens must be at least 1"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 2}, "'n' is not supported"),
    ("/v1/chat/completions", {"messages": []}, "messages: no messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 40}]}, "the message is 44 tokens long"),
    ("/v1/completions", {"prompt": "a" * 33}, "the prompt is 33 tokens long"),
]


@pytest.mark.parametrize(("path", "body", "message"), BAD_REQUESTS)
def test_bad_requests_are_400s_and_the_server_goes_on(server, path, body, message):
    url, _ = server
    status, reply = call(url + path, body)
    assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    assert message in reply["error"]["message"]
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
    bodies = [{"messages": HELLO, "temperature": 1.0, "seed": 1}, {"prompt": "to be", "temperature": 0}]
    paths = ["/v1/chat/completions", "/v1/completions"]
    alone = [call(url + p, b)[1]["choices"][0] for p, b in zip(paths, bodies, strict=True)]
    together: list = [None, None]

    def request(i: int) -> None:
        together[i] = call(url + paths[i], bodies[i])[1]["choices"][0]

    threads = [threading.Thread(target=request, args=(i,)) for i in range(2)]
    with srv.lock:  # as if a long generation were running
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert together == [None, None] and all(t.is_alive() for t in threads)  # queued, not failed
    for t in threads:
        t.join(timeout=60)
    assert together == alone


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--ckpt", "missing.ckpt"], "error: missing.ckpt: checkpoint not found"),
        (["--ckpt", "missing.ckpt", "--top_p", "0"], "error: top_p must be in (0, 1]"),
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
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = process.stdout.readline()  # lm serve: model 'tiny' at http://127.0.0.1:PORT/v1 (Ctrl-C to stop)
        base = banner.split(" at ")[1].split()[0]
        assert base.startswith("http://127.0.0.1:") and not base.endswith(":0/v1")
        status, reply = call(base + "/chat/completions", {"messages": HELLO, "max_tokens": 3})
        assert status == 200 and reply["model"] == "tiny" and reply["usage"]["completion_tokens"] <= 3
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()  # a no-op once it has exited
    assert process.returncode == 0, err
    assert "lm serve: stopped" in out
