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
uses lm's generation engine (`lm.generate.generate_texts`, batched, KV cache). lm-eval is an optional extra
(`pip install "lm[eval]"`).
"""

from __future__ import annotations

import sys
from typing import Any

from lm.errors import LMError

try:
    import lm_eval.models  # noqa: F401 - registers lm-eval's own models first (it only does so into an empty registry)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise LMError('the lm-evaluation-harness adapter needs lm-eval: pip install "lm[eval]"') from None

import torch

from lm.eval import score_continuations


@register_model("lm")
class LMEvalAdapter(TemplateLM):
    """An `lm` GPT + tokenizer in memory, scored with lm's own batched code.

    Args (`--model_args key=value,...`):
        ckpt: an lm checkpoint; or pass `model=` and `tokenizer=` objects from Python.
        batch_size: sequences per forward pass (lm-eval's `--batch_size`; "auto" means 16).
        device: cpu, cuda, ... (default: cuda when available).
        max_gen_toks: default generation budget of generate_until.
    """

    def __init__(
        self,
        ckpt: str | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int | str | None = 16,
        device: str | None = None,
        max_gen_toks: int = 256,
        **_ignored: Any,  # lm-eval passes max_batch_size and others that do not apply here
    ) -> None:
        super().__init__()
        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI passes device=cuda by default
        if ckpt is not None:
            from lm.checkpoint import load_checkpoint

            model, tokenizer, _ = load_checkpoint(ckpt, map_location=device)
        if model is None or tokenizer is None:
            raise LMError("the lm model for lm-eval needs ckpt=PATH (or model= and tokenizer= from Python)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = max_gen_toks

    # ---- what TemplateLM needs ---------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id  # also the prefix of an empty context: the start-of-document state

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

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
        """Each string on its own: EOS, then the tokens in windows of block_size, every token scored once with as
        much context as fits (lm-eval's rolling windows, as its HF model does it)."""
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
        """Greedy (or sampled, if asked) continuations cut at the first `until` string; requests with the same
        generation arguments run as one batch through lm's generation engine."""
        from lm.generate import generate_texts

        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            keep = max(1, self.max_length - max_new) if max_new < self.max_length else self.max_length // 2
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-keep:] for i in chunk]
                texts = generate_texts(
                    self.model,
                    self.tokenizer,
                    prompts,
                    stop_strings=until,
                    max_new_tokens=max_new,
                    temperature=temperature,
                )
                for i, text in zip(chunk, texts, strict=True):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs  # type: ignore[return-value]


def main() -> None:
    """`python -m lm.lm_eval_adapter ARGS`: lm-eval's command line with the "lm" model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
