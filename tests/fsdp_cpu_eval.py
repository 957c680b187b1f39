"""Run by tests/test_eval.py: EvalCallback and TaskAccuracy inside a real Lightning FSDPStrategy fit on 2 CPU processes
(gloo), where Lightning re-runs this script for the second rank.

Lightning refuses FSDP with accelerator=cpu, hands FSDP device_id=None there, and autocasts its mixed precisions on
"cuda" only; these three are patched below, nothing else, so the sharding (each Block wrapped, the LightningModule the
root) and the precision are those a GPU run gets.

    python tests/fsdp_cpu_eval.py OUT_DIR TASK [PRECISION]  # TASK: lm or addition; each rank writes OUT_DIR/rank-R.json
"""

import datetime
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.connectors import accelerator_connector
from torch.distributed.fsdp import FullyShardedDataParallel

from lm.config import GPTConfig
from lm.data import PretrainData
from lm.eval import EvalCallback
from lm.model import Block
from lm.module import LanguageModel
from lm.tasks import TaskAccuracy

accelerator_connector._AcceleratorConnector._check_strategy_and_fallback = lambda self: None
_fsdp_init = FullyShardedDataParallel.__init__


def _on_the_cpu(self, *args, **kwargs):
    if kwargs.get("device_id") is None:
        kwargs["device_id"] = torch.device("cpu")
    _fsdp_init(self, *args, **kwargs)


FullyShardedDataParallel.__init__ = _on_the_cpu


def _autocast_on_the_cpu(self):
    dtype = torch.bfloat16 if self.precision.startswith("bf16") else torch.float16
    return torch.autocast("cpu", dtype=dtype, enabled="mixed" in self.precision)


FSDPPrecision.forward_context = _autocast_on_the_cpu

out, task = Path(sys.argv[1]), sys.argv[2]
precision = sys.argv[3] if len(sys.argv) > 3 else "32-true"
(out / "corpus").mkdir(parents=True, exist_ok=True)
(out / "corpus" / "0.txt").write_text("0123456789+ abcdefghijklmnopqrstuvwxyz reverse count in\n" * 40)
data = PretrainData(
    source=str(out / "corpus"), tokenizer="char", block_size=16, batch_size=4, cache_dir=str(out / "c"), num_proc=1
)
module = LanguageModel(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32), warmup_steps=1)
spec = {"task": "lm", "data": str(out / "corpus")} if task == "lm" else {"task": task, "num_problems": 4}
callbacks = [EvalCallback([spec], every_n_validations=None, every_n_steps=2)]
if task != "lm":
    callbacks.append(TaskAccuracy(task=task, num_problems=4))
trainer = L.Trainer(
    accelerator="cpu",
    devices=2,
    strategy=FSDPStrategy(auto_wrap_policy={Block}, timeout=datetime.timedelta(seconds=180)),
    max_steps=3,
    precision=precision,
    val_check_interval=3,
    limit_val_batches=1,
    num_sanity_val_steps=0,
    logger=False,
    callbacks=callbacks,
    enable_progress_bar=False,
    enable_checkpointing=False,
    enable_model_summary=False,
)
trainer.fit(module, datamodule=data)
metrics = {k: round(float(v), 4) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("eval")}
# A file per rank, not a printed line: both ranks share the caller's stdout, and with PYTHONUNBUFFERED print() writes
# the text and its newline apart, so under load the two lines came out as one ("rank 0: {...}rank 1: {...}")
(out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(metrics))
