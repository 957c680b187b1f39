"""The chat format, and `lm chat`: a terminal chat with a fine-tuned checkpoint.

One renderer turns a conversation into token ids and a loss mask, for training and for inference alike:

    BOS [<|system|> system text <|end|>] <|user|> question <|end|> <|assistant|> answer <|end|> <|user|> ...

The mask is 1 on every assistant turn's content and on the `<|end|>` that closes it (so the model learns to stop),
and 0 on BOS, the system and user turns and every turn marker. An inference prompt is the same rendering of the
history, ending with `<|assistant|>`. Content is encoded with `tokenizer.encode`, which never turns marker strings
typed by a user into marker tokens.

    lm chat --ckpt runs/sft_hh/checkpoints/last.ckpt                         # interactive; /reset, /system TEXT
    lm chat --ckpt runs/sft_hh/checkpoints/last.ckpt --prompt "Hi there"     # answer once and exit
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import re
import sys
from collections.abc import Sequence
from typing import Any

from lm.errors import ArgumentParser, LMError
from lm.tokenizer import ASSISTANT, BOS, END, EOS, SYSTEM, USER, Tokenizer

CHAT_TEMPLATE_VERSION = 1  # bump when the rendering below changes: models fine-tuned on another version mismatch
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

Message = dict[str, str]


def join_text_parts(messages: Sequence[Any]) -> list[Any]:
    """Messages whose content is a list of OpenAI text parts (`[{"type": "text", "text": "..."}, ...]`) get the parts'
    text joined into one string, which is what the chat template renders; other messages are returned unchanged, for
    check_messages to judge. Raises ValueError on a part that is not text (images, audio)."""
    joined = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(parts := m.get("content"), list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and type(p.get("text")) is str for p in parts):
                raise ValueError(f'message {i}: only text content parts {{"type": "text", "text": "..."}} are read')
            m = {**m, "content": "".join(p["text"] for p in parts)}
        joined.append(m)
    return joined


def tidy_messages(messages: Sequence[Any]) -> list[Any]:
    """OpenAI's `developer` role read as `system` (its newer name for it), and a system message whose content is blank
    left out (exports often carry `"system": ""`, which says nothing): both were refused as malformed. Other messages
    are returned unchanged, for check_messages to judge."""
    tidy = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "developer":
            m = {**m, "role": "system"}
        blank = isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip()
        if not (blank and m.get("role") == "system"):
            tidy.append(m)
    return tidy


def check_messages(messages: Sequence[Message], *, need_reply: bool = True) -> str | None:
    """Why a conversation is malformed, or None when it is fine.

    Valid: an optional system message first, then user and assistant turns alternating, starting with the user;
    every content a non-empty string; with need_reply, the last turn is the assistant's (something to learn).
    """
    if not messages:
        return "no messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} is not a {{'role', 'content'}} object"
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            return f"message {i} has unknown role {m['role']!r} (expected one of {list(ROLES)})"
        if not isinstance(m["content"], str):
            return f"message {i} ({m['role']}) content is not a string (got {type(m['content']).__name__})"
        if not m["content"].strip():
            return f"message {i} ({m['role']}) has empty content"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return f"turns do not alternate user/assistant: {m['role']} where {expected} was expected"
    if need_reply and (not turns or turns[-1]["role"] != "assistant"):
        return "no assistant reply to learn from"
    return None


def render_chat(
    messages: Sequence[Message], tokenizer: Tokenizer, *, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (same length) of a conversation. With add_generation_prompt, the ids end with the
    assistant marker, ready for the model to write the next reply. Does not validate: see `check_messages`."""
    ids, mask = [tokenizer.token_id(BOS)], [0]
    end = tokenizer.token_id(END)
    for m in messages:
        content = tokenizer.encode(m["content"])
        learn = int(m["role"] == "assistant" and m.get("weight", 1) != 0)  # weight 0: a reply shown, not learned
        ids += [tokenizer.token_id(ROLES[m["role"]]), *content, end]
        mask += [0, *[learn] * len(content), learn]  # an assistant's END is learned: that is how it stops
    if add_generation_prompt:
        ids.append(tokenizer.token_id(ASSISTANT))
        mask.append(0)
    return ids, mask


def render_prompt(messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
    """The inference prompt: the history (ending with a user turn) followed by the assistant marker."""
    return render_chat(messages, tokenizer, add_generation_prompt=True)[0]


def fit_history(messages: list[Message], tokenizer: Tokenizer, budget: int) -> tuple[list[Message], list[int]]:
    """Drop the oldest user/assistant exchanges (never the system message nor the last user turn) until the prompt
    fits in `budget` tokens; returns the kept messages and their prompt. Raises LMError when even the last turn alone
    does not fit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    # render_chat gives each message its marker, its content and END: the prompt's length is a sum over messages,
    # so each is encoded once and the cut found in one pass (re-rendering per dropped exchange was quadratic: a
    # 1,600-message request to lm serve took 10 s)
    sizes = [len(tokenizer.encode(m["content"])) + 2 for m in turns]
    fixed = len(render_prompt(system, tokenizer))  # BOS, the system message, the assistant marker
    total, start = fixed + sum(sizes), 0
    while total > budget and len(turns) - start > 1:
        total -= sum(sizes[start : start + 2])  # one exchange: a user turn and the assistant's reply
        start += 2
    turns = turns[start:]
    prompt = render_prompt(system + turns, tokenizer)
    if len(prompt) <= budget:
        return system + turns, prompt
    if not system:  # even the last turn alone does not fit
        raise LMError(f"the message is {len(prompt)} tokens long; the context leaves room for {budget}")
    raise LMError(
        f"the system message and the message are {len(prompt)} tokens long (the system message takes "
        f"{len(render_chat(system, tokenizer)[0])}); the context leaves room for {budget}"
    )


# ---- replying with a checkpoint: lm chat and lm serve --------------------------------------------------------------


def reply_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """END closes the assistant's turn. In an undertrained model any other special token ends it too: BOS/EOS (a new
    conversation or document) and every role marker (the model writing the next turn itself). None of them may reach
    the reply's text: a char tokenizer cannot encode "<|user|>" as text, so that reply would break the next turn."""
    return tuple(dict.fromkeys(tokenizer.token_id(t) for t in (END, EOS, BOS, USER, SYSTEM, ASSISTANT)))


DEFAULT_REPLY_TOKENS = 256  # lm chat's and lm serve's longest reply, unless a flag or request says otherwise


def add_reply_flags(p: argparse.ArgumentParser, *, max_new_tokens_help: str, seed_help: str | None = None) -> None:
    """The device and sampling flags of lm chat and lm serve, with the same defaults."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULT_REPLY_TOKENS, help=max_new_tokens_help)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    p.add_argument("--top_k", type=int, default=50, help="0: no top-k filter")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--repetition_penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=1337, help=seed_help)


def load_chat_checkpoint(args: argparse.Namespace):
    """(model, tokenizer, device) of args.ckpt, after checking the sampling flags (a bad one would otherwise fail
    every message or request, not stop here) and warning when it was trained on another chat template."""
    from lm.checkpoint import load_for_inference
    from lm.generate import check_sampling

    check_sampling(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty
    )
    if args.max_new_tokens < 1:  # 0 or less would stretch the prompt's budget past the context and reply nothing
        raise LMError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer, info, device = load_for_inference(args.ckpt, args.device)
    version = info.get("chat_template_version")
    if version is not None and version != CHAT_TEMPLATE_VERSION:
        print(f"warning: {args.ckpt} was trained on chat template v{version}; this is v{CHAT_TEMPLATE_VERSION}")
    return model, tokenizer, device


# ---- lm chat ------------------------------------------------------------------------------------------------------


BLOCK = '"""'  # opens and closes a message of several lines at the chat prompt
CHAT_COMMANDS = ("/reset", "/system", "/quit", "/exit", "/help")


def _commands_answer(line: str) -> str:
    """The one-line answer to /help, or to a line that is one slash word but no command (with the nearest one)."""
    if line == "/help":
        return (
            "(/reset forgets the conversation, /system TEXT sets the system message and resets, /quit or /exit "
            "(Ctrl-D) ends the chat; other lines are messages)"
        )
    near = difflib.get_close_matches(line, CHAT_COMMANDS, n=1)
    hint = f", did you mean {near[0]}?" if near else "."
    return f"(unknown command {line}{hint} The commands are /reset, /system TEXT, /quit, /exit, /help)"


def read_message() -> str:
    """One message from the chat prompt: a line, or several between triple-quote marks (a pasted paragraph or code),
    which would otherwise arrive as one turn per line. A block opened by a line that is only the mark ends at an
    unindented line that is only the mark, so pasted code may hold docstrings (a module's own closing mark would end
    it); one opened by the mark and text ends at a line ending in the mark. Blank lines around the message are
    dropped, indentation kept. End of input closes the block; Ctrl-C drops it."""
    line = input("> ")
    if not line.strip().startswith(BLOCK):
        return line.strip()
    first = line.strip()[len(BLOCK) :]
    if first.endswith(BLOCK):  # the mark, a message, the mark: one line
        return first[: -len(BLOCK)].strip()

    def closes(line: str) -> bool:  # opened by a bare mark: only an unindented bare mark (a docstring's is indented)
        return line.rstrip() == BLOCK if not first else line.rstrip().endswith(BLOCK)

    lines = [first]
    try:
        while not closes(line := input(". ")):
            lines.append(line)
        lines.append(line.rstrip()[: -len(BLOCK)])
    except EOFError:
        pass  # what was typed is the message; the next prompt ends the chat
    except KeyboardInterrupt:
        print("\n(message dropped)")
        return ""
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


def undecodable_bytes_pass_through() -> None:
    """Bytes that are not UTF-8 in what the terminal types or pipes in (a Latin-1 file) come through as lone
    surrogates, as Python already reads them under a C locale, and are written back as they came, instead of a
    traceback from input() or print(): the tokenizers then write them as U+FFFD (BPE) or refuse them in one line
    (char)."""
    for stream in (sys.stdin, sys.stdout):
        if hasattr(stream, "reconfigure"):  # a TextIOWrapper; not pytest's capture, say
            stream.reconfigure(errors="surrogateescape")


def chat_command(argv: list[str]) -> None:
    """lm chat: talk to a checkpoint in the terminal, or answer one --prompt and exit."""
    p = ArgumentParser(
        prog="lm chat",
        description="Chat with a fine-tuned checkpoint. Commands: /reset (forget the conversation), /system TEXT "
        '(set the system message and reset), /quit, /help. A line of three double quotes (""") starts a message of '
        "several lines, and another ends it.",
    )
    p.add_argument("--ckpt", required=True, help="path to a .ckpt written by lm fit (an SFT run)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="system message at the start of the conversation")
    add_reply_flags(p, max_new_tokens_help="longest reply, in tokens (at most half the model's context)")
    p.set_defaults(max_new_tokens=None)  # to tell a length asked for, capped with a note, from the default
    args = p.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():  # as lm serve refuses it: an empty message asks nothing
        raise LMError("--prompt is empty")
    asked = args.max_new_tokens is not None
    if not asked:
        args.max_new_tokens = DEFAULT_REPLY_TOKENS

    import torch

    from lm.generate import stream_text

    # The interactive loop below reports an LMError and keeps chatting, so flags are checked before it starts.
    model, tokenizer, device = load_chat_checkpoint(args)
    generator = torch.Generator(device).manual_seed(args.seed)
    max_new = min(args.max_new_tokens, model.config.block_size // 2)  # leave half the context for the history
    if asked and max_new < args.max_new_tokens:
        print(
            f"note: replies stop at {max_new} tokens, half of this model's context of {model.config.block_size} "
            "(the other half holds the conversation)",
            file=sys.stderr,
        )
    sampling = dict(
        max_new_tokens=max_new,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_ids=reply_stop_ids(tokenizer),
        generator=generator,
    )
    # A blank --system is no system message, as lm serve and the SFT data read a blank one (and as /system clears it)
    system = args.system if args.system and args.system.strip() else None
    if system is not None:
        try:  # checked now: it is rendered into every prompt, and each turn failed naming a character of no message
            tokenizer.encode(system)
        except LMError as e:
            raise LMError(f"--system: {e}") from None
    undecodable_bytes_pass_through()

    def reply(history: list[Message]) -> str:
        history[:], prompt = fit_history(history, tokenizer, model.config.block_size - max_new)
        pieces = []
        # skip_special: a tokenizer's specials other than lm's six (which all stop the reply) never reach the text.
        for piece in stream_text(model, tokenizer, prompt, skip_special=True, **sampling):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        return "".join(pieces)

    def fresh() -> list[Message]:
        return [{"role": "system", "content": system}] if system else []

    if args.prompt is not None:
        reply(fresh() + [{"role": "user", "content": args.prompt}])
        return

    history = fresh()
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # not on every platform's Python
            import readline  # noqa: F401 - input() then edits the line (arrows, Ctrl-A...) and recalls earlier ones
    print(f"lm chat: /reset, /system TEXT, /quit (Ctrl-D), /help; {BLOCK} starts and ends a message of several lines")
    while True:
        try:
            line = read_message()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = fresh()
            print("(conversation reset)")
            continue
        if line == "/system" or line.startswith("/system "):  # not "/systemd is broken", a message
            text = line[len("/system") :].strip() or None
            try:  # as --system: one the tokenizer cannot encode would fail every turn after it
                tokenizer.encode(text or "")
            except LMError as e:
                print(f"error: the system message is not set: {e}", file=sys.stderr)
                continue
            system = text
            history = fresh()
            print(f"(system message {'set' if system else 'cleared'}; conversation reset)")
            continue
        if re.fullmatch(r"/[^\s/]*", line):
            # /help, or one slash word that is no command ("/qiut" for /quit): the commands, not a message to the model
            # (a char model could not even encode the slash). More words ("/systemd fails") or a path are a message.
            print(_commands_answer(line))
            continue
        # The turn works on a copy and is kept only once the reply is known to render in the next prompt, so a
        # failed turn leaves the conversation as it was: no user turn without its reply, no reply that would make
        # every later turn fail until /reset.
        turn = [*history, {"role": "user", "content": line}]
        try:
            answer = reply(turn)
        except LMError as e:  # a message too long for the context: say so and keep chatting
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops a reply (a long or looping one); Ctrl-C at the prompt quits
            print("\n(reply interrupted; the turn is not kept)")
            continue
        try:
            tokenizer.encode(answer)
        except LMError as e:
            print(f"error: the reply is not kept in the conversation: {e}", file=sys.stderr)
            continue
        history = [*turn, {"role": "assistant", "content": answer}]  # an empty reply renders as <|assistant|><|end|>
