"""Replies of `lm chat` (and the stop ids lm serve shares): a reply ends at any special token, holds no special
token's text, and a turn is kept only when the conversation still renders with it. The model here is scripted: its
greedy next token is a function of its last one, so a reply is known in advance."""

import pytest
import torch

import lm.checkpoint
import lm.generate
from lm.__main__ import main
from lm.chat import check_messages, render_prompt, reply_stop_ids
from lm.config import get_config
from lm.model import GPT
from lm.tokenizer import ASSISTANT, END, SPECIAL_TOKENS, USER, CharTokenizer, Tokenizer

DIGITS = CharTokenizer.train(["0123456789+"])  # as an addition SFT run's: no space, no "<"


def scripted_model(tokenizer: Tokenizer, follow: dict[str | int, str | int], vocab_size: int = 64) -> GPT:
    """A tiny GPT whose logits make follow[last token] (tokens as strings, specials by name, or ids) the only likely
    next token; any other last token is followed by <|end|>. vocab_size: at least the tokenizer's."""
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=vocab_size, block_size=64)).eval()
    table = torch.full((vocab_size,), tokenizer.token_id(END))

    def token_id(token: str | int) -> int:
        if isinstance(token, int):
            return token
        return tokenizer.token_id(token) if token in SPECIAL_TOKENS else tokenizer.encode(token)[0]

    for last, nxt in follow.items():
        table[token_id(last)] = token_id(nxt)

    def force(module, args, logits):  # (B, T, V): only the last position is sampled from
        forced = torch.full_like(logits, -1e4)
        forced[torch.arange(len(logits)), -1, table[args[0][:, -1]]] = 1e4
        return forced

    model.register_forward_hook(force)
    return model


def chat(monkeypatch, capsys, model: GPT, tokenizer: Tokenizer, lines: list[str]) -> tuple[str, str]:
    """Run interactive `lm chat` on the model, typing `lines`; returns (stdout, stderr)."""
    monkeypatch.setattr(lm.checkpoint, "load_for_inference", lambda ckpt, device: (model, tokenizer, {}, "cpu"))
    typed = iter([*lines, "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    main(["chat", "--ckpt", "scripted.ckpt", "--device", "cpu", "--temperature", "0"])
    out = capsys.readouterr()
    return out.out, out.err


def test_stop_ids_are_every_special_token():
    assert set(reply_stop_ids(DIGITS)) == {DIGITS.token_id(t) for t in SPECIAL_TOKENS}


def test_a_reply_ends_at_a_role_marker_and_the_next_turn_works(monkeypatch, capsys):
    """An undertrained model writes the user's next turn itself ("12<|user|>3..."): the reply is "12", and the
    conversation, which a char tokenizer could not render with "<|user|>" as text, goes on."""
    model = scripted_model(DIGITS, {ASSISTANT: "1", "1": "2", "2": USER, USER: "3"})
    out, err = chat(monkeypatch, capsys, model, DIGITS, ["7", "8"])
    assert err == ""
    assert out.splitlines()[1:] == ["12", "12"]


def test_an_empty_reply_is_kept_as_empty_text(monkeypatch, capsys):
    """The model ends its turn at once; " " in its place could not be rendered by a tokenizer without a space."""
    model = scripted_model(DIGITS, {})
    out, err = chat(monkeypatch, capsys, model, DIGITS, ["7", "8"])
    assert err == "" and out.splitlines()[1:] == ["", ""]


def test_a_reply_that_cannot_be_rendered_is_not_kept(monkeypatch, capsys):
    """Whatever the reply holds, a failed turn leaves the conversation as it was, so the next turn still works."""
    prompts = []

    def stream_text(model, tokenizer, prompt, **sampling):
        prompts.append(prompt)
        yield "1<2" if len(prompts) == 1 else "3"

    monkeypatch.setattr(lm.generate, "stream_text", stream_text)
    out, err = chat(monkeypatch, capsys, scripted_model(DIGITS, {}), DIGITS, ["7", "8"])
    assert err.startswith("error: the reply is not kept in the conversation: character '<'") and err.count("\n") == 1
    assert prompts[1] == render_prompt([{"role": "user", "content": "8"}], DIGITS)  # the broken exchange is gone


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(monkeypatch, capsys):
    """Ctrl-C during a reply drops that turn and returns to the prompt (it used to end lm chat with a traceback)."""
    prompts = []

    def stream_text(model, tokenizer, prompt, **sampling):
        prompts.append(prompt)
        yield "1"
        if len(prompts) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(lm.generate, "stream_text", stream_text)
    out, err = chat(monkeypatch, capsys, scripted_model(DIGITS, {}), DIGITS, ["7", "8"])
    assert err == "" and "(reply interrupted; the turn is not kept)" in out
    assert prompts[1] == render_prompt([{"role": "user", "content": "8"}], DIGITS)


def test_special_tokens_that_do_not_stop_leave_no_text():
    """skip_special: a special token that is not a stop id (another tokenizer's own specials) is not text either."""
    model = scripted_model(DIGITS, {"7": "1", "1": USER, USER: "2"})
    kwargs = dict(max_new_tokens=3, temperature=0, stop_ids=[DIGITS.token_id(END)])
    text = "".join(lm.generate.stream_text(model, DIGITS, DIGITS.encode("7"), **kwargs))
    assert text == "1<|user|>2"
    assert "".join(lm.generate.stream_text(model, DIGITS, DIGITS.encode("7"), skip_special=True, **kwargs)) == "12"
    # the batched engine (task evals, the lm-eval adapter) decodes as the stream does
    assert lm.generate.generate_texts(model, DIGITS, [DIGITS.encode("7")], **kwargs) == ["1<|user|>2"]
    assert lm.generate.generate_texts(model, DIGITS, [DIGITS.encode("7")], skip_special=True, **kwargs) == ["12"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [(5, "message 0 (user) content is not a string (got int)"), (" ", "message 0 (user) has empty content")],
)
def test_a_content_that_is_not_a_string_is_named_so(content, reason):
    assert check_messages([{"role": "user", "content": content}], need_reply=False) == reason


def test_slash_system_is_a_command_only_as_a_word(monkeypatch, capsys):
    """ "/systemd 7" is a message to answer; it used to set the system message "d 7" and drop the conversation."""
    import string

    tok = CharTokenizer.train([string.ascii_lowercase + string.digits + " /"])
    model = scripted_model(tok, {ASSISTANT: "1", "1": "2"})
    out, err = chat(monkeypatch, capsys, model, tok, ["/systemd 7", "/system be brief", "8"])
    assert err == ""
    assert out.splitlines()[1:] == ["12", "(system message set; conversation reset)", "12"]


def test_a_system_message_too_long_for_the_context_is_named(monkeypatch, capsys):
    model = scripted_model(DIGITS, {})
    monkeypatch.setattr(lm.checkpoint, "load_for_inference", lambda ckpt, device: (model, DIGITS, {}, "cpu"))
    typed = iter(["7", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    main(["chat", "--ckpt", "x.ckpt", "--system", "1" * 40, "--max_new_tokens", "32", "--temperature", "0"])
    err = capsys.readouterr().err
    assert err.startswith(
        "error: the system message and the message are 47 tokens long (the system message takes 43); "
    )


@pytest.mark.parametrize("system", [" ", "\n"])
def test_a_blank_system_flag_is_no_system_message_as_in_lm_serve(monkeypatch, capsys, system):
    """lm serve and the SFT data leave a blank system message out; --system " " rendered it, so lm chat prompted
    (and answered) differently from lm serve for the same conversation."""
    prompts = []

    def stream_text(model, tokenizer, prompt, **sampling):
        prompts.append(prompt)
        yield "1"

    monkeypatch.setattr(lm.generate, "stream_text", stream_text)
    monkeypatch.setattr(
        lm.checkpoint, "load_for_inference", lambda ckpt, device: (scripted_model(DIGITS, {}), DIGITS, {}, "cpu")
    )
    main(["chat", "--ckpt", "x.ckpt", "--prompt", "7", "--system", system])
    assert prompts == [render_prompt([{"role": "user", "content": "7"}], DIGITS)]


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_new_tokens_below_one_is_refused(monkeypatch, capsys, value):
    monkeypatch.setattr(lm.checkpoint, "load_for_inference", lambda ckpt, device: (None, DIGITS, {}, "cpu"))
    with pytest.raises(SystemExit) as stop:
        main(["chat", "--ckpt", "x.ckpt", "--prompt", "7", "--max_new_tokens", value])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: --max_new_tokens must be at least 1, got {value}\n"


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_an_empty_prompt_is_refused_as_lm_serve_refuses_it(capsys, prompt):
    with pytest.raises(SystemExit) as stop:
        main(["chat", "--ckpt", "x.ckpt", "--prompt", prompt])  # was answered, as if a message had been sent
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: --prompt is empty\n"


def test_a_message_of_several_lines_between_triple_quotes_is_one_turn(monkeypatch, capsys):
    """A pasted paragraph arrived as one turn per line; between triple quotes it is one message. Ctrl-C inside
    such a block drops it, and the chat goes on."""
    import string

    prompts = []

    def stream_text(model, tokenizer, prompt, **sampling):
        prompts.append(prompt)
        yield "1"

    typed = iter(['"""ab', "  c", 'd"""', '"""dropped', KeyboardInterrupt, '"""one"""', "/quit"])

    def type_line(prompt=""):
        line = next(typed)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    tok = CharTokenizer.train([string.ascii_lowercase + string.digits + " \n"])
    monkeypatch.setattr(lm.generate, "stream_text", stream_text)
    monkeypatch.setattr(
        lm.checkpoint, "load_for_inference", lambda ckpt, device: (scripted_model(tok, {}), tok, {}, "cpu")
    )
    monkeypatch.setattr("builtins.input", type_line)
    main(["chat", "--ckpt", "x.ckpt", "--temperature", "0"])
    out = capsys.readouterr()
    assert out.err == "" and "(message dropped)" in out.out
    first = [{"role": "user", "content": "ab\n  c\nd"}]
    assert prompts[0] == render_prompt(first, tok)
    assert prompts[1] == render_prompt(
        [*first, {"role": "assistant", "content": "1"}, {"role": "user", "content": "one"}], tok
    )
    assert len(prompts) == 2


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        (["  plain line  "], "plain line"),
        (['"""one line"""'], "one line"),
        # a bare mark ends only at an unindented bare mark: pasted code keeps its docstrings and its indentation
        (
            ['"""', "    def f():", '        """Doc."""', "        return 1", '"""  '],
            '    def f():\n        """Doc."""\n        return 1',
        ),
        (
            ['"""', "def f():", '    """Return one.', "", "    More.", '    """', "    return 1", '"""'],
            'def f():\n    """Return one.\n\n    More.\n    """\n    return 1',
        ),
        (['"""ab', "", "  c", 'd"""'], "ab\n\n  c\nd"),  # opened with text: ends at a line ending in the mark
        (['"""', "", "text", "", '"""'], "text"),  # blank lines around it dropped
        (['"""', "first", EOFError], "first"),  # end of input closes the block: what was typed is sent
        (['"""', "first", KeyboardInterrupt], ""),  # Ctrl-C drops it
    ],
)
def test_read_message_takes_several_lines_between_triple_quotes(monkeypatch, capsys, typed, message):
    from lm.chat import read_message

    lines = iter(typed)

    def type_line(prompt=""):
        line = next(lines)
        if line in (EOFError, KeyboardInterrupt):
            raise line
        return line

    monkeypatch.setattr("builtins.input", type_line)
    assert read_message() == message
    assert next(lines, None) is None  # read exactly the message's lines
    assert ("(message dropped)" in capsys.readouterr().out) == (typed[-1] is KeyboardInterrupt)


def test_a_slash_word_that_is_no_command_gets_the_commands_not_a_reply(monkeypatch, capsys):
    """ "/qiut" (for /quit) and "/help" went to the model as messages: a reply to a typo, or with a char tokenizer
    without "/" an error. A line of more words or a path is still a message."""
    import string

    tok = CharTokenizer.train([string.ascii_lowercase + string.digits + " /"])
    model = scripted_model(tok, {ASSISTANT: "1", "1": "2"})
    out, err = chat(monkeypatch, capsys, model, tok, ["/qiut", "/help", "/usr/bin 7"])
    assert err == ""
    unknown, help_line, reply = out.splitlines()[1:]
    assert unknown == (
        "(unknown command /qiut, did you mean /quit? The commands are /reset, /system TEXT, /quit, /exit, /help)"
    )
    assert help_line.startswith("(/reset forgets the conversation, /system TEXT sets the system message")
    assert reply == "12"


def test_a_system_message_the_tokenizer_cannot_encode_is_refused_when_given(monkeypatch, capsys):
    """It was kept, and every turn after it failed naming a character at an offset of no message typed ("7" has no
    "x"), until the next /system. /system refuses it and keeps the one before; --system stops at once."""
    model = scripted_model(DIGITS, {ASSISTANT: "1", "1": "2"})
    out, err = chat(monkeypatch, capsys, model, DIGITS, ["/system 1x", "7"])
    reason = "character 'x' (at offset 1) is not in the char tokenizer's vocabulary"
    assert err == f"error: the system message is not set: {reason}\n"
    assert out.splitlines()[1:] == ["12"]
    with pytest.raises(SystemExit) as stop:
        main(["chat", "--ckpt", "x.ckpt", "--system", "1x"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: --system: {reason}\n"
