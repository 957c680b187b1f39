"""Run by tests/test_distributed.py: one optimizer step of a real Lightning FSDPStrategy fit on 2 CPU processes
(gloo) with the given sharding strategy; rank 0 writes the step's gradient norm (train/grad_norm) to OUT_DIR/norm.json.
As tests/fsdp_cpu_eval.py, Lightning's refusal of FSDP on the CPU and its device_id=None are patched, nothing else.

    python tests/fsdp_cpu_grad_norm.py OUT_DIR FULL_SHARD|NO_SHARD
"""

import datetime
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.connectors import accelerator_connector
from torch.distributed.fsdp import FullyShardedDataParallel

from lm.config import GPTConfig
from lm.model import Block
from lm.module import LanguageModel

accelerator_connector._AcceleratorConnector._check_strategy_and_fallback = lambda self: None
_fsdp_init = FullyShardedDataParallel.__init__


def _on_the_cpu(self, *args, **kwargs):
    if kwargs.get("device_id") is None:
        kwargs["device_id"] = torch.device("cpu")
    _fsdp_init(self, *args, **kwargs)


FullyShardedDataParallel.__init__ = _on_the_cpu

out, sharding = Path(sys.argv[1]), sys.argv[2]
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 64, (4, 16), generator=g)  # every rank the same batch: the norm is one process's
torch.manual_seed(0)
module = LanguageModel(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_size=64), warmup_steps=1)
trainer = L.Trainer(
    accelerator="cpu",
    devices=2,
    strategy=FSDPStrategy(
        auto_wrap_policy={Block}, sharding_strategy=sharding, timeout=datetime.timedelta(seconds=180)
    ),
    max_steps=1,
    log_every_n_steps=1,
    limit_val_batches=0,
    logger=False,
    enable_progress_bar=False,
    enable_checkpointing=False,
    enable_model_summary=False,
    use_distributed_sampler=False,
)
trainer.fit(module, torch.utils.data.DataLoader([{"input_ids": ids, "labels": ids}], batch_size=None))
if trainer.global_rank == 0:
    (out / "norm.json").write_text(json.dumps(float(trainer.callback_metrics["train/grad_norm"])))
