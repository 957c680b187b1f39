"""`lm export` to a transformers directory: logits parity in fp32, the same greedy continuation, tokenizer ids."""

import json

import pytest
import torch
import transformers  # lm[dev] installs it: a missing one fails here rather than skipping the HF parity checks

from lm.__main__ import main
from lm.chat import render_prompt, reply_stop_ids
from lm.errors import LMError
from lm.export import export_hf, hf_state_dict
from lm.generate import stream_tokens
from lm.model import GPT
from lm.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer
from tests.test_eval import write_checkpoint

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll: Speak, speak!  it's 42 ü"


def char_tokenizer() -> CharTokenizer:
    return CharTokenizer.train([TEXT])


def assert_parity(model: GPT, out_dir, tokenizer: Tokenizer, expected_class: str) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    assert type(hf).__name__ == expected_class
    torch.manual_seed(1)
    ids = torch.randint(0, tokenizer.vocab_size, (3, model.config.block_size))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    prompt = tokenizer.encode(TEXT[:10])
    # lm's engine never samples the padded rows past the tokenizer; the exported generation config suppresses them
    ours_greedy = list(stream_tokens(model, prompt, max_new_tokens=12, temperature=0, vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        # min_new_tokens: HF would stop at EOS, lm's engine too, but here we compare raw greedy paths.
        generated = hf.generate(
            torch.tensor([prompt]), max_new_tokens=len(ours_greedy), do_sample=False, eos_token_id=None
        )
    assert generated[0, len(prompt) :].tolist() == ours_greedy


def test_llama_export_matches_logits_and_greedy(tmp_path):
    tokenizer = char_tokenizer()
    model = write_checkpoint(tmp_path / "c.ckpt", tokenizer, block_size=24, n_layer=2, n_head=4, n_embd=64)
    out = export_hf(tmp_path / "c.ckpt", tmp_path / "hf")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(tokenizer.vocab_size, model.config.vocab_size))
    # a class transformers 4.x has too (5.x wrote its own "TokenizersBackend", which 4.x cannot load)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert transformers.AutoTokenizer.from_pretrained(str(out)).encode("hear me", add_special_tokens=False) == (
        tokenizer.encode("hear me")
    )
    assert_parity(model, out, tokenizer, "LlamaForCausalLM")


def test_the_exported_weights_are_as_readable_as_the_rest_of_the_directory(tmp_path):
    """safetensors writes a private (0600) file whatever the umask: the exported model was readable by its owner
    alone, where config.json and the tokenizer follow the umask (0644 under the usual 022)."""
    import os
    import stat

    write_checkpoint(tmp_path / "c.ckpt", char_tokenizer(), block_size=8, n_layer=1, n_head=2, n_embd=16)
    old_umask = os.umask(0o022)
    try:
        out = export_hf(tmp_path / "c.ckpt", tmp_path / "hf")
    finally:
        os.umask(old_umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


def test_an_export_over_an_earlier_sharded_save_deletes_its_shards(tmp_path):
    """The old shards and their index stayed beside the new model.safetensors: vLLM loads the files the index names,
    i.e. the earlier model. Only transformers' shard names go; the user's other files stay."""
    write_checkpoint(tmp_path / "c.ckpt", char_tokenizer(), block_size=8, n_layer=1, n_head=2, n_embd=16)
    out = tmp_path / "hf"
    out.mkdir()
    stale = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    kept = ["notes.txt", "model-final.safetensors", "pytorch_model.bin"]
    for name in stale + kept:
        (out / name).write_text("x")
    export_hf(tmp_path / "c.ckpt", out)
    names = {p.name for p in out.iterdir()}
    assert not names & set(stale) and set(kept) <= names and "model.safetensors" in names


def test_an_export_over_an_earlier_tokenizer_s_legacy_files_keeps_its_own_tokens(tmp_path):
    """transformers still reads special_tokens_map.json and added_tokens.json, which 5.x no longer writes: an earlier
    save's copies (transformers 4 writes the map; another model's tokens) made BOS "<s>", a string this tokenizer
    does not have, and the word "hear" one token."""
    tokenizer = char_tokenizer()
    write_checkpoint(tmp_path / "c.ckpt", tokenizer, block_size=8, n_layer=1, n_head=2, n_embd=16)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (out / "added_tokens.json").write_text(json.dumps({"hear": 99}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export_hf(tmp_path / "c.ckpt", out)))
    assert (hf_tok.bos_token, hf_tok.eos_token) == ("<|bos|>", "<|eos|>")
    assert hf_tok.encode("hear me") == tokenizer.encode("hear me")


def test_qwen3_export_with_qk_norm_gqa_and_tied_embeddings(tmp_path):
    tokenizer = char_tokenizer()
    arch = dict(block_size=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, qk_norm=True, tie_embeddings=True)
    model = write_checkpoint(tmp_path / "q.ckpt", tokenizer, **arch)
    out = export_hf(tmp_path / "q.ckpt", tmp_path / "hf")
    assert "lm_head.weight" not in hf_state_dict(model)  # tied: transformers re-ties it from the config
    assert_parity(model, out, tokenizer, "Qwen3ForCausalLM")


def test_the_exported_config_carries_the_model_s_rope_theta_context_and_eos(tmp_path):
    """A long-context model's RoPE base (Llama 3's 500000) must reach both keys transformers reads (4.x rope_theta,
    5.x rope_parameters): with the default 10000 there, transformers computes other logits than lm."""
    tokenizer = char_tokenizer()
    arch = dict(block_size=24, n_layer=1, n_head=2, n_embd=32, rope_theta=500000.0)
    model = write_checkpoint(tmp_path / "r.ckpt", tokenizer, **arch)
    out = export_hf(tmp_path / "r.ckpt", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 500000.0
    assert config["max_position_embeddings"] == 24
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)
    assert_parity(model, out, tokenizer, "LlamaForCausalLM")


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_exported_tokenizer_gives_the_same_ids(tmp_path, kind):
    tokenizer = {
        "char": char_tokenizer,
        "bpe": lambda: BPETokenizer.train([TEXT * 3], vocab_size=300),
        "gpt2": GPT2Tokenizer,
    }[kind]()
    write_checkpoint(tmp_path / "t.ckpt", tokenizer, block_size=16, n_layer=1, n_head=2, n_embd=32)
    out = export_hf(tmp_path / "t.ckpt", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in (TEXT, TEXT[5:40], " speak", "\n\n"):
        assert hf_tok.encode(text) == tokenizer.encode(text), text
        assert hf_tok.decode(tokenizer.encode(text)) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id)

    # The chat template renders a conversation into the ids lm's SFT trained on and lm chat prompts with.
    chat = [{"role": "system", "content": "Speak"}, {"role": "user", "content": TEXT[:30]}]
    chat += [{"role": "assistant", "content": " speak"}, {"role": "user", "content": "All: \n\nhear me"}]
    templated = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert list(getattr(templated, "input_ids", templated)) == render_prompt(chat, tokenizer)
    # transformers stops where lm chat does: EOS (first, the pad id transformers falls back to), <|end|>, BOS, markers.
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == tokenizer.eos_id
    assert sorted(generation["eos_token_id"]) == sorted(reply_stop_ids(tokenizer))
    # For readers that look in tokenizer_config.json only (transformers 4 before template files, serving stacks),
    # and that would otherwise clean up spaces in decoded char-level text ("Yes . No" read back as "Yes. No")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == hf_tok.chat_template and config["clean_up_tokenization_spaces"] is False


def test_an_exported_foreign_tokenizer_that_adds_bos_in_its_post_processor_gives_lm_s_ids(tmp_path):
    """lm never adds a post-processor's tokens; Llama's and Mistral's tokenizer.json put BOS before every encode."""
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import models, pre_tokenizers, processors

    words = {"<s>": 0, "</s>": 1, "[UNK]": 2, **{w: 3 + i for i, w in enumerate(TEXT.split()[:40])}}
    backend = HFBackend(models.WordLevel(words, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.load(tmp_path / "tokenizer.json")
    write_checkpoint(tmp_path / "t.ckpt", tokenizer, block_size=16, n_layer=1, n_head=2, n_embd=32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export_hf(tmp_path / "t.ckpt", tmp_path / "hf")))
    text = " ".join(TEXT.split()[:6])
    assert tokenizer.encode(text)[0] != 0
    assert hf_tok.encode(text) == tokenizer.encode(text) == hf_tok(text)["input_ids"]


def metaspace_checkpoint(path) -> Tokenizer:
    """A checkpoint with a foreign BPE tokenizer that pre-tokenizes as Mistral's does (Metaspace, "▁" on the first
    piece of a text only); returns the tokenizer."""
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFBackend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), pre_tokenizers.Digits()]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator([TEXT * 20], trainer)
    backend.save(str(path.parent / "tokenizer.json"))
    tokenizer = Tokenizer.load(path.parent / "tokenizer.json")
    write_checkpoint(path, tokenizer, block_size=64, n_layer=1, n_head=2, n_embd=32)
    return tokenizer


def test_an_exported_metaspace_tokenizer_s_chat_template_gives_the_ids_lm_chat_prompts_with(tmp_path):
    """Metaspace with prepend_scheme "first" (Mistral's, newer Llama conversions) put the "▁" on the first piece of
    transformers' rendered chat only, so every message after the BOS came out as "Hello" where lm, which encodes each
    message apart, had trained on "▁Hello"."""
    tokenizer = metaspace_checkpoint(tmp_path / "t.ckpt")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export_hf(tmp_path / "t.ckpt", tmp_path / "hf")))
    chat = [
        {"role": "system", "content": "Speak, speak!"},
        {"role": "user", "content": "Before we proceed"},
        {"role": "assistant", "content": "All: hear me 42"},
        {"role": "user", "content": "any further"},
    ]
    ids = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert list(getattr(ids, "input_ids", ids)) == render_prompt(chat, tokenizer)
    for text in (TEXT, "Speak", " any further"):
        assert hf_tok.encode(text) == tokenizer.encode(text)


def test_lm_export_says_when_the_exported_chat_template_gives_other_ids_than_lm_chat(tmp_path, capsys, monkeypatch):
    """A foreign tokenizer can pre-tokenize the text between chat markers in a way no fix foresaw: the export checks a
    sample conversation and says so (here by undoing the Metaspace fix)."""
    import lm.export

    metaspace_checkpoint(tmp_path / "t.ckpt")
    main(["export", "--ckpt", str(tmp_path / "t.ckpt"), "--out", str(tmp_path / "fixed")])
    assert "note:" not in capsys.readouterr().out
    monkeypatch.setattr(lm.export, "_prefix_every_piece", lambda pre_tokenizer: None)
    main(["export", "--ckpt", str(tmp_path / "t.ckpt"), "--out", str(tmp_path / "hf")])
    assert "note: transformers' apply_chat_template gives other ids than lm chat" in capsys.readouterr().out


def test_lm_export_warns_that_a_char_model_s_unknown_characters_become_eos(tmp_path, capsys):
    write_checkpoint(tmp_path / "t.ckpt", char_tokenizer(), block_size=16, n_layer=1, n_head=2, n_embd=32)
    main(["export", "--ckpt", str(tmp_path / "t.ckpt"), "--out", str(tmp_path / "hf")])
    assert "a character it never saw encodes as EOS" in capsys.readouterr().out


def test_lm_export_does_not_give_the_char_note_for_a_foreign_word_level_tokenizer(tmp_path, capsys):
    """A foreign WordLevel tokenizer has its own unknown token; the note is about lm's char tokenizer only."""
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import models, pre_tokenizers

    words = {"<s>": 0, "</s>": 1, "[UNK]": 2, **{w: 3 + i for i, w in enumerate(TEXT.split()[:40])}}
    backend = HFBackend(models.WordLevel(words, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(tmp_path / "tokenizer.json"))
    write_checkpoint(
        tmp_path / "t.ckpt", Tokenizer.load(tmp_path / "tokenizer.json"), block_size=16, n_layer=1, n_head=2, n_embd=32
    )
    main(["export", "--ckpt", str(tmp_path / "t.ckpt"), "--out", str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert out.startswith("exported ") and "note:" not in out


def test_export_of_a_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(LMError, match="checkpoint not found"):
        export_hf(tmp_path / "nope.ckpt", tmp_path / "hf")


def test_export_onto_a_file_is_a_user_error(tmp_path):
    write_checkpoint(tmp_path / "c.ckpt", char_tokenizer(), block_size=8, n_layer=1, n_head=2, n_embd=16)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(LMError, match="afile: a file, not a directory"):
        export_hf(tmp_path / "c.ckpt", tmp_path / "afile")


def test_an_unwritable_out_is_a_one_line_error(tmp_path, capsys):
    write_checkpoint(tmp_path / "c.ckpt", char_tokenizer(), block_size=8, n_layer=1, n_head=2, n_embd=16)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "hf"  # under a file: not writable, even for root
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(tmp_path / "c.ckpt"), "--out", str(out)])
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: cannot write {out}: Not a directory\n"
