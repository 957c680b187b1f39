"""lm-evaluation-harness adapter: an `lm` checkpoint as an `lm_eval` model named "lm".

lm-eval finds models through its registry only (`--include_path` loads tasks, not models), so this module must be
imported before lm-eval resolves `--model lm`. Run the harness through this module, which registers the model and
then hands its arguments to lm-eval's own command line:

    python -m lm.lm_eval_adapter --model lm --model_args ckpt=runs/x/checkpoints/last.ckpt --tasks hellaswag \
        --batch_size 16 [--include_path my_tasks/]

or from Python:

    from lm.lm_eval_adapter import LMEvalAdapter
    lm_eval.simple_evaluate(model=LMEvalAdapter(ckpt="last.ckpt"), tasks=[...])

Scoring is `lm.eval.score_continuations` (the same code as `lm eval --task hellaswag`), batched; `generate_until`
uses lm's generation engine (`lm.generate.generate_texts`, batched, KV cache), reads the generation arguments as the
harness's own models do (temperature, top_k, top_p and repetition_penalty are applied; another, such as num_beams, is
named in a warning), stops at any special token (a chat model's end of turn) and leaves special tokens out of the
text, as HF models decode with skip_special_tokens. `--apply_chat_template` renders prompts with lm's chat
template (`lm.chat.render_chat`, the one SFT trains on), to the same ids: a text that starts with BOS's text is read
as a rendered chat, its markers as special tokens; marker text inside a message or a continuation ("<|end|>", gpt2's
"<|endoftext|>") stays text, as there, for chats rendered in this process (contexts that lm-eval's `--cache_requests`
reads back from an earlier run are split at every marker's text). Any other text is text, marker text included.
lm-eval is an optional extra (`pip install "lm[eval]"`).
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any, NamedTuple

from lm.errors import LMError
from lm.tokenizer import BOS

try:
    import lm_eval.models  # noqa: F401 - registers lm-eval's own models first (it only does so into an empty registry)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    NEEDS = 'the lm-evaluation-harness adapter needs lm-eval: pip install "lm[eval]"'
    if __name__ == "__main__":  # python -m lm.lm_eval_adapter: one line, as lm's own commands say it
        print(f"error: {NEEDS}", file=sys.stderr)
        sys.exit(2)
    raise LMError(NEEDS) from None

import torch

from lm.eval import score_continuations


@register_model("lm")
class LMEvalAdapter(TemplateLM):
    """An `lm` GPT + tokenizer in memory, scored with lm's own batched code.

    Args (`--model_args key=value,...`):
        ckpt: an lm checkpoint; or pass `model=` and `tokenizer=` objects from Python.
        batch_size: sequences per forward pass; "auto" means 16. lm-eval's `--batch_size` (its default: 1) sets it
            too; a batch_size in --model_args wins.
        device: cpu, cuda, ... (default: cuda when available); as batch_size, over lm-eval's `--device`.
        max_gen_toks: default generation budget of generate_until.
    """

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        # lm-eval's command line passes its own batch_size and device beside --model_args: a key given in both was
        # a TypeError ("got multiple values for keyword argument 'device'")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def __init__(
        self,
        ckpt: str | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int | str | None = 16,
        device: str | None = None,
        max_gen_toks: int = 256,
        **ignored: Any,  # lm-eval passes max_batch_size, which does not apply here
    ) -> None:
        super().__init__()
        if unknown := sorted(set(ignored) - {"max_batch_size"}):  # a typo in --model_args would go unnoticed
            warnings.warn(
                f"lm model: ignoring model_args {unknown}; it takes ckpt, batch_size, device, max_gen_toks",
                stacklevel=2,
            )
        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI passes device=cuda by default
        if ckpt is not None:
            from lm.checkpoint import load_for_inference

            model, tokenizer, _, device = load_for_inference(ckpt, device)
        if model is None or tokenizer is None:
            raise LMError("the lm model for lm-eval needs ckpt=PATH (or model= and tokenizer= from Python)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = max_gen_toks
        self._ignored_gen_kwargs: set[str] = set()  # generation arguments already warned about, each named once
        # Keyed by the text each special decodes to, which is what the rendered chat holds: gpt2's BOS is
        # "<|endoftext|>" and a Llama-style tokenizer.json's "<s>", not lm's "<|bos|>". Longest first, so that no
        # marker matches the start of a longer one.
        self._special_text = {i: tokenizer.decode([i]) for i in sorted(set(tokenizer.special_ids.values()))}
        self._specials = {text: i for i, text in self._special_text.items() if text}
        self._special_pattern = re.compile(
            "(" + "|".join(map(re.escape, sorted(self._specials, key=len, reverse=True))) + ")"
        )
        # A chat rendered by apply_chat_template starts with BOS's text, and the harness encodes it as text: its
        # markers must become the special tokens again (lm's tokenizers otherwise encode special-token strings as
        # plain text, by design). Told by its start, not by a call of apply_chat_template in this process: lm-eval's
        # --cache_requests reads the rendered contexts of an earlier run back, and their markers were encoded as text.
        self._chat_start = self._special_text[tokenizer.token_id(BOS)]
        # The chats apply_chat_template rendered: keyed by the text up to the chat's last marker, its pieces as (text,
        # is it a marker). The rest of a string the harness encodes (the open reply, a continuation) is a reply's
        # content, and marker text in it ("<|end|>", gpt2's "<|endoftext|>") is text, as render_chat encodes it; so
        # is marker text in the chat's contents. Every chat, not only those with marker text in their messages: a
        # continuation's marker text is only told from the chat's own markers by where the chat ends.
        self._rendered_chats: dict[str, list[tuple[str, bool]]] = {}

    # ---- what TemplateLM needs ---------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id  # also the prefix of an empty context: the start-of-document state

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if not self._chat_start or not string.startswith(self._chat_start):  # not a chat: text, markers' text too
            return self.tokenizer.encode(string)
        specials, encode = self._specials, self.tokenizer.encode
        if self._rendered_chats:
            # The chat this string starts with (the harness appends a continuation, or strips trailing spaces)
            for match in reversed(list(self._special_pattern.finditer(string))):
                chat = self._rendered_chats.get(string[: match.end()])
                if chat is not None:
                    head = [i for text, is_marker in chat for i in ([specials[text]] if is_marker else encode(text))]
                    return head + encode(string[match.end() :])
        pieces = self._special_pattern.split(string)  # text, marker, text, marker, ...
        return [i for piece in pieces for i in ([specials[piece]] if piece in specials else encode(piece))]

    # ---- chat templates (--apply_chat_template) ----------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return f"lm-{self.tokenizer.kind}-{self.tokenizer.fingerprint}"  # keys the harness's request cache

    def chat_template(self, chat_template: bool | str = False) -> str:
        from lm.chat import CHAT_TEMPLATE_VERSION

        return f"lm chat template v{CHAT_TEMPLATE_VERSION} (lm.chat.render_chat)"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered as SFT renders it, as text: BOS, then each turn's role marker, content and END;
        with add_generation_prompt the assistant marker follows, and without it a last assistant message is left
        open (the harness prefills the reply's start). tok_encode turns it into `lm.chat.render_chat`'s ids."""
        from lm.chat import ROLES
        from lm.tokenizer import ASSISTANT, END

        # Each content is put in as it is, not decoded from render_chat's ids: tok_encode encodes the text between
        # markers as render_chat encodes a content, and a decode does not always give back the text that encodes to
        # the same ids (a SentencePiece-style decoder writes "▁Hello" after a marker as " Hello", which encodes to
        # "▁▁Hello").
        def marker(token: str) -> str:
            return self._special_text[self.tokenizer.token_id(token)]

        parts = [(marker(BOS), True)]
        for m in chat_history:
            parts += [(marker(ROLES[m["role"]]), True), (m["content"], False), (marker(END), True)]
        if add_generation_prompt:
            parts.append((marker(ASSISTANT), True))
        elif chat_history and chat_history[-1]["role"] == "assistant":
            parts.pop()  # its END
        if self._specials:
            # marker text in a content or a continuation is text, as render_chat encodes it (a split on markers made it
            # special tokens)
            last_marker = max(k for k, (_, is_marker) in enumerate(parts) if is_marker)
            head = parts[: last_marker + 1]
            self._rendered_chats["".join(text for text, _ in head)] = head
        return "".join(text for text, _ in parts)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = score_continuations(
            self.model, [(context, continuation) for _, context, continuation in requests], batch_size=self.batch_size
        )
        for (request, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string on its own: EOS, then its tokens in disjoint windows of block_size predicted tokens, every
        token scored once (lm-eval's rolling windows with context_len 1, as its HF model does it). Not with as much
        context as fits: the k-th token of a full window is predicted from the k tokens before it, so the first of
        each window after the first sees only the token before it; a last, shorter window reads back as far as
        block_size allows."""
        windows, owner = [], []
        for i, request in enumerate(requests):
            (string,) = request.args
            token_windows = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(make_disjoint_window, token_windows):
                windows.append(window)
                owner.append(i)
        scores = score_continuations(self.model, windows, batch_size=self.batch_size)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores, strict=True):
            totals[i] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if asked: temperature, top_k, top_p, repetition_penalty) continuations cut at the
        first `until` string; requests with the same generation arguments run as one batch through lm's generation
        engine. Another generation argument (num_beams, min_p, ...) is named in a warning, once, and not applied."""
        from lm.chat import reply_stop_ids
        from lm.generate import generate_texts

        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            until, max_new, sampling, unsupported = generation_args(requests[indices[0]].args[1], self.max_gen_toks)
            if unheard := [k for k in unsupported if k not in self._ignored_gen_kwargs]:
                self._ignored_gen_kwargs.update(unheard)
                warnings.warn(
                    f"lm model: ignoring generation arguments {unheard}; lm's generation reads until, max_gen_toks (or "
                    f"an alias), do_sample, {', '.join(SAMPLING_ARGS)}",
                    stacklevel=2,
                )
            keep = max(1, self.max_length - max_new) if max_new < self.max_length else self.max_length // 2
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-keep:] for i in chunk]
                texts = generate_texts(
                    self.model,
                    self.tokenizer,
                    prompts,
                    stop_strings=until,
                    stop_ids=reply_stop_ids(self.tokenizer),  # EOS, and a chat model's end of turn
                    skip_special=True,
                    max_new_tokens=max_new,
                    **sampling,
                )
                for i, text in zip(chunk, texts, strict=True):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs  # type: ignore[return-value]


# Generation arguments lm's engine reads: beside these, generate_until's gen_kwargs hold the stop strings, the
# budget and do_sample. lm-eval's HF model hands every other key to transformers' generate().
SAMPLING_ARGS = {"temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float}
BUDGET_ARGS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # in lm-eval's order


class GenerationArgs(NamedTuple):
    until: list[str]  # stop strings
    max_new_tokens: int
    sampling: dict[str, float | int]  # lm.generate's temperature, and top_k, top_p, repetition_penalty when given
    unsupported: list[str]  # keys lm's engine has no setting for (num_beams, min_p, ...): not applied


def generation_args(kwargs: dict[str, Any], default_max_gen_toks: int) -> GenerationArgs:
    """The generation arguments of a generate_until request, read as lm-eval's own models read them (its
    `normalize_gen_kwargs`): the budget from max_gen_toks, max_new_tokens, max_tokens or max_completion_tokens, in
    that order; without do_sample, a temperature above 0 samples; do_sample false is greedy. top_k, top_p and
    repetition_penalty go to lm.generate, as lm-eval's HF model hands them to transformers' generate()."""
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else [s for s in until if s]  # an empty stop string is no stop
    budgets = (kwargs.get(k) for k in BUDGET_ARGS)
    max_new = int(next((b for b in budgets if b is not None), default_max_gen_toks))
    sampling = {k: convert(kwargs[k]) for k, convert in SAMPLING_ARGS.items() if kwargs.get(k) is not None}
    sampling["temperature"] = sampling.get("temperature") or 0.0
    if kwargs.get("do_sample") is False:
        sampling["temperature"] = 0.0
    known = {"until", "do_sample", *BUDGET_ARGS, *SAMPLING_ARGS}
    unsupported = sorted(k for k, v in kwargs.items() if k not in known and v is not None)
    return GenerationArgs(until, max_new, sampling, unsupported)


def main() -> None:
    """`python -m lm.lm_eval_adapter ARGS`: lm-eval's command line with the "lm" model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
