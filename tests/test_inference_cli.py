"""`lm generate`, `lm chat` and `lm fit --ckpt_path` through `lm.__main__.main`, in process: what they print, and
bad flags or files as one-line errors with exit code 2."""

import pytest
import torch

import lm.generate
from lm.__main__ import main
from lm.tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer
from tests.conftest import REPO
from tests.test_eval import write_checkpoint

TINY = dict(block_size=32, n_layer=1, n_head=2, n_embd=32)


@pytest.fixture
def char_ckpt(tmp_path):
    path = tmp_path / "char.ckpt"
    write_checkpoint(path, CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz .,!?\n"]), **TINY)
    return str(path)


def run(capsys, *argv) -> tuple[int, str, str]:
    """Exit code (0 when main returns), stdout, stderr."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_generate_prints_characters_that_span_tokens(capsys, tmp_path, monkeypatch):
    """An emoji or a CJK character is several GPT-2 tokens: printing the decoded text of each new token dropped them."""
    path = tmp_path / "gpt2.ckpt"
    tok = GPT2Tokenizer()
    write_checkpoint(path, tok, **TINY)
    target = " naïve \U0001f600 café 日本"
    ids = tok.encode(target)
    assert len(ids) > len(target.split())  # some characters do span tokens
    monkeypatch.setattr(lm.generate, "stream_tokens", lambda model, prompt, **sampling: iter(ids))
    code, out, err = run(capsys, "generate", "--ckpt", str(path), "--prompt", "X", "--device", "cpu")
    assert (code, err) == (0, "")
    assert out == "X" + target + "\n"


BAD_SAMPLING = [
    ("--top_k", "-1", "top_k"),
    ("--top_p", "-0.1", "top_p"),
    ("--top_p", "1.5", "top_p"),
    ("--temperature", "nan", "temperature"),
    ("--temperature", "-1", "temperature"),
    ("--temperature", "inf", "temperature"),
]


@pytest.mark.parametrize(("flag", "value", "name"), BAD_SAMPLING)
def test_generate_refuses_bad_sampling_arguments_in_one_line(capsys, char_ckpt, flag, value, name):
    code, out, err = run(capsys, "generate", "--ckpt", char_ckpt, "--device", "cpu", "--prompt", "ab", flag, value)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {name} must be")
    assert out == ""  # nothing sampled, not even the prompt


@pytest.mark.parametrize(
    ("flag", "value"), [("--max_new_tokens", "0"), ("--max_new_tokens", "-3"), ("--num_samples", "0")]
)
def test_generate_refuses_counts_below_one_in_one_line(capsys, char_ckpt, flag, value):
    """They printed the prompt alone (or nothing) and exited 0."""
    code, out, err = run(capsys, "generate", "--ckpt", char_ckpt, "--device", "cpu", "--prompt", "ab", flag, value)
    assert (code, out) == (2, "")
    assert err == f"error: {flag} must be at least 1, got {value}"


def test_chat_says_when_it_caps_a_reply_length_asked_for_at_half_the_context(capsys, char_ckpt):
    """--max_new_tokens above half the context was cut to it without a word. The default (256) is cut as well,
    without a note: nobody asked for it."""
    chat = ["chat", "--ckpt", char_ckpt, "--device", "cpu", "--prompt", "hi"]
    code, _, err = run(capsys, *chat, "--max_new_tokens", "100")
    assert code == 0
    assert "replies stop at 16 tokens, half of this model's context of 32" in err
    for within in (["--max_new_tokens", "16"], []):
        assert run(capsys, *chat, *within)[::2] == (0, "")


@pytest.mark.parametrize(
    ("flag", "value", "name"), [*BAD_SAMPLING, ("--repetition_penalty", "0", "repetition_penalty")]
)
def test_chat_refuses_bad_sampling_arguments_in_one_line(capsys, char_ckpt, flag, value, name):
    code, _, err = run(capsys, "chat", "--ckpt", char_ckpt, "--device", "cpu", "--prompt", "hi", flag, value)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {name} must be")


def test_interactive_chat_stops_at_a_bad_sampling_argument(capsys, char_ckpt, monkeypatch):
    """The interactive loop reports an LMError and keeps chatting (a message too long): a bad flag must not get there,
    where it would fail every message."""
    lines = iter(["hi", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, _, err = run(capsys, "chat", "--ckpt", char_ckpt, "--device", "cpu", "--top_p", "1.5")
    assert code == 2
    assert err == "error: top_p must be in [0, 1] (0: the top token only; unset: no top-p filter), got 1.5"


def test_resume_from_a_file_that_is_not_a_lightning_checkpoint(capsys, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"a": 1}, path)
    code, _, err = run(capsys, "fit", "--config", str(REPO / "experiments" / "debug.yaml"), "--ckpt_path", str(path))
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}: not a Lightning checkpoint")


def test_resume_from_a_weights_only_checkpoint_is_one_line(capsys, tmp_path):
    """checkpoint.save_weights_only writes no optimizer state: Lightning's restore failed with a KeyError traceback
    (exit 1) after the whole set-up. Such a file starts a new run through init_from."""
    path = tmp_path / "weights.ckpt"
    write_checkpoint(path, CharTokenizer("abc"), n_layer=1, n_head=2, n_embd=16, block_size=8)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "pytorch-lightning_version": "2.6.0", "loops": {}}, path)  # what save_weights_only keeps
    code, _, err = run(capsys, "fit", "--config", str(REPO / "experiments" / "debug.yaml"), "--ckpt_path", str(path))
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}: holds the weights only (checkpoint.save_weights_only)")
    assert f"--model.init_args.init_from {path}" in err


def test_a_weights_only_last_ckpt_names_another_root_for_the_new_run(capsys, tmp_path, monkeypatch):
    """A new run in the same root moves its last.ckpt aside before the model reads init_from: the advice followed
    as given ended in "runs/wo/checkpoints/last.ckpt: checkpoint not found"."""
    monkeypatch.chdir(tmp_path)
    run_args = ["fit", "--config", str(REPO / "experiments" / "debug.yaml"), "--trainer.logger", "false",
                "--samples.max_new_tokens", "0", "--trainer.default_root_dir", "runs/wo", "--trainer.max_steps", "2",
                "--trainer.val_check_interval", "2", "--checkpoint.save_weights_only", "true"]  # fmt: skip
    assert run(capsys, *run_args)[0] == 0
    code, _, err = run(capsys, *run_args, "--ckpt_path", "last")
    assert code == 2 and err.endswith(
        "--model.init_args.init_from runs/wo/checkpoints/last.ckpt and another trainer.default_root_dir"
    )
    code, _, err = run(capsys, *run_args, "--model.init_args.init_from", "runs/wo/checkpoints/last.ckpt",
                       "--trainer.default_root_dir", "runs/new")  # fmt: skip
    assert code == 0, err
    assert torch.load(tmp_path / "runs/new/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2


def test_resume_keeps_the_checkpoints_model_arguments_for_a_file_and_for_last_alike(capsys, tmp_path, monkeypatch):
    """The restored optimizer holds the run's lr: a new one must not be written into the checkpoint unused (as it was
    with `last`), nor dropped without a word (as with a file). Runtime arguments (max_skipped_steps,
    activation_checkpointing) may change."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "run"
    fit = ["fit", "--config", str(REPO / "experiments" / "debug.yaml"), "--trainer.logger", "false"]
    fit += ["--trainer.default_root_dir", str(root), "--trainer.val_check_interval", "2", "--trainer.max_steps"]
    assert run(capsys, *fit, "2")[0] == 0
    last = root / "checkpoints" / "last.ckpt"
    first = tmp_path / "step2.ckpt"
    first.write_bytes(last.read_bytes())
    changed = ["--model.init_args.lr", "0.007", "--model.init_args.max_skipped_steps", "3"]
    changed += ["--model.init_args.activation_checkpointing", "true"]
    for steps, ckpt_path in (("3", str(first)), ("4", "last")):
        code, out, err = run(capsys, *fit, steps, *changed, "--ckpt_path", ckpt_path)
        assert (code, err) == (0, "")
        ignored = out.split("here:")[1]
        assert "lr 0.007 (checkpoint: 0.003)" in ignored
        assert "max_skipped_steps" not in ignored and "activation_checkpointing" not in ignored
        saved = torch.load(last, weights_only=True)
        assert saved["hyper_parameters"]["activation_checkpointing"] is True
        assert saved["global_step"] == int(steps)
        assert (saved["hyper_parameters"]["lr"], saved["hyper_parameters"]["max_skipped_steps"]) == (0.003, 3)
        assert saved["lr_schedulers"][0]["base_lrs"][0] == 0.003


def test_lm_alone_lists_every_command_and_a_typo_names_the_nearest(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("fit", "validate", "generate", "chat", "serve", "eval", "tasks", "export", "tokenizer", "sweep"):
        assert f"\n  {command} " in out
    code, _, err = run(capsys, "generat", "--ckpt", "x")
    assert code == 2 and err.startswith("error: unknown command 'generat' (did you mean 'generate'?)")
    assert len(err.splitlines()) == 1


def test_tokenizer_train_to_an_unwritable_directory_is_one_line_before_training(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the output directory's parent should be
    code, _, err = run(
        capsys, "tokenizer", "train", "--source", str(text), "--kind", "char", "--out", str(blocker / "x")
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert err == f"error: cannot write {blocker / 'x'}: Not a directory"


def test_tokenizer_train_on_unreadable_data_leaves_no_empty_folder(capsys, tmp_path):
    """The output folder is made before training (an unwritable one fails fast); a source it cannot read (chat JSONL
    has no text field) left it behind empty. A folder that was there already stays."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    code, _, err = run(
        capsys, "tokenizer", "train", "--source", str(chat), "--kind", "char", "--out", str(tmp_path / "tok")
    )
    assert code == 2 and "no column 'text'" in err and not (tmp_path / "tok").exists()
    (tmp_path / "mine").mkdir()
    code, _, _ = run(
        capsys, "tokenizer", "train", "--source", str(chat), "--kind", "char", "--out", str(tmp_path / "mine")
    )
    assert code == 2 and (tmp_path / "mine").is_dir()


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_tokenizer_train_refuses_a_source_with_no_text(capsys, tmp_path, kind):
    """--kind bpe saved a tokenizer of the 256 bytes alone from an empty file and exited 0 (char refused it)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, out, err = run(capsys, "tokenizer", "train", "--source", str(empty), "--kind", kind,
                         "--out", str(tmp_path / "tok"))  # fmt: skip
    assert code == 2 and not out and not (tmp_path / "tok").exists()
    assert err.splitlines()[-1] == f"error: data source {str(empty)!r} holds no text (empty files or 'text' fields)"


def test_tokenizer_train_says_when_the_bpe_has_fewer_ids_than_asked(capsys, tmp_path):
    """HF's trainer stops once every word is one token: 300 asked of a two-word source saved fewer without a word."""
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    code, out, _ = run(capsys, "tokenizer", "train", "--source", str(text), "--vocab_size", "300",
                       "--out", str(tmp_path / "tok"))  # fmt: skip
    ids = Tokenizer.load(tmp_path / "tok").vocab_size
    assert code == 0 and ids < 300
    short = "(not the 300 asked: no pair of tokens within a word is left to merge)"
    assert out == f"saved bpe tokenizer with {ids} ids to {tmp_path / 'tok'} {short}\n"


def test_tokenizer_train_refuses_a_vocab_size_too_small_before_it_reads_the_source(capsys, tmp_path, monkeypatch):
    """It read (for a hub id: downloaded) the whole source first, and only then refused the size."""
    import datasets

    def hub(source, **kwargs):
        raise AssertionError("the source was read")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    code, _, err = run(capsys, "tokenizer", "train", "--source", "org/corpus", "--vocab_size", "100",
                       "--out", str(tmp_path / "tok"))  # fmt: skip
    assert code == 2 and err == "error: tokenizer 'bpe:100': vocab size must exceed 262 (6 specials + 256 bytes)"
    assert not (tmp_path / "tok").exists()


def test_tokenizer_train_refuses_a_vocab_size_for_a_char_tokenizer(capsys, tmp_path):
    """--kind char --vocab_size 256 saved a char tokenizer of the source's characters without a word about the size."""
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    code, _, err = run(capsys, "tokenizer", "train", "--source", str(text), "--kind", "char", "--vocab_size", "256",
                       "--out", str(tmp_path / "tok"))  # fmt: skip
    assert code == 2 and err.startswith("error: --vocab_size is for --kind bpe") and not (tmp_path / "tok").exists()
    code, out, _ = run(capsys, "tokenizer", "train", "--source", str(text), "--kind", "char",
                       "--out", str(tmp_path / "tok"))  # fmt: skip
    assert code == 0 and out.startswith("saved char tokenizer with 15 ids")


def test_tokenizer_train_reads_a_hub_dataset_s_config_split_and_revision(capsys, tmp_path, monkeypatch):
    """They were not passed on (a dataset that needs a config could not be read); with a local source, refused."""
    import datasets

    calls = []

    def hub(source, **kwargs):
        calls.append({"source": source, **kwargs})
        return datasets.Dataset.from_dict({"text": ["hello world", "hello there"]})

    monkeypatch.setattr(datasets, "load_dataset", hub)
    hub_flags = ["--source_config", "sample-10BT", "--source_split", "validation", "--source_revision", "v1"]
    code, out, err = run(capsys, "tokenizer", "train", "--source", "org/corpus", "--kind", "char", *hub_flags,
                         "--out", str(tmp_path / "tok"))  # fmt: skip
    assert code == 0, err
    (call,) = calls
    assert (call["name"], call["split"], call["revision"]) == ("sample-10BT", "validation", "v1")
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    code, _, err = run(capsys, "tokenizer", "train", "--source", str(text), "--kind", "char", "--source_config", "x",
                       "--out", str(tmp_path / "tok2"))  # fmt: skip
    assert code == 2 and err.startswith("error: source_config: for hub datasets only")


def _lm(*argv, **popen):
    import subprocess
    import sys

    from tests.conftest import cli_env

    env = cli_env(PYTHONPATH=str(REPO), PYTHONIOENCODING="utf-8")  # strict UTF-8, as under en_US.UTF-8
    return subprocess.Popen([sys.executable, "-m", "lm", *argv], env=env, cwd=REPO, text=False, **popen)


@pytest.mark.slow
def test_generate_into_a_pipe_that_closes_or_stopped_by_ctrl_c_ends_without_a_traceback(char_ckpt):
    """`lm generate ... | head -c 1` ended in a BrokenPipeError traceback, and Ctrl-C in a torch one, ~30 frames."""
    import signal
    import subprocess

    args = ("generate", "--ckpt", char_ckpt, "--device", "cpu", "--prompt", "ab", "--max_new_tokens", "100000")
    head = _lm(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert head.stdout.read(1) == b"a"
    head.stdout.close()  # as head does once it has its byte
    assert head.wait(timeout=120) == 128 + signal.SIGPIPE
    assert head.stderr.read() == b""

    # SIGINT as a terminal has it: a shell's background job (a CI runner's, say) starts with it ignored
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    stopped = _lm(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    assert stopped.stdout.read(1) == b"a"  # generating
    stopped.send_signal(signal.SIGINT)
    out, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 128 + signal.SIGINT and b"Traceback" not in err, err[-2000:]


def test_chat_input_that_is_not_utf8_is_refused_in_one_line_and_the_chat_goes_on(char_ckpt):
    """A Latin-1 byte piped or typed into lm chat under a UTF-8 locale was a UnicodeDecodeError traceback from input()
    and the conversation was lost; it now reaches the tokenizer, which refuses it (char) or writes U+FFFD (BPE)."""
    import subprocess

    chat = _lm("chat", "--ckpt", char_ckpt, "--device", "cpu", "--max_new_tokens", "4", stdin=subprocess.PIPE,
               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    out, err = chat.communicate(b"caf\xe9\nhello\n", timeout=120)
    assert chat.returncode == 0 and b"Traceback" not in err, err[-2000:]
    assert err.count(b"error: ") == 1 and b"is not in the char tokenizer's vocabulary" in err
    assert out.count(b"> ") == 3  # the bad line, hello (answered), then the end of the input
