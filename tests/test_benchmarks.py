"""The benchmark scripts: they measure the model they were asked for, and run end to end on a tiny one."""

import importlib.util
import json

import pytest

from tests.conftest import REPO


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("flags", "shape"),
    [
        ([], (4, 4, 128, 64, 128)),  # the CPU recipe's model
        (["--n_layer", "2"], (2, 4, 128, 64, 128)),
        (["--size", "tiny"], (2, 2, 32, 16, 64)),  # a named size as it is (it used to get the CPU recipe's shape)
        (["--size", "124m", "--block_size", "256"], (12, 12, 768, 256, 50304)),  # the override was dropped
        (["--size", "124m", "--n_layer", "4"], (4, 12, 768, 1024, 50304)),
    ],
)
def test_train_throughput_builds_the_model_asked_for(flags, shape):
    bench = load("train_throughput")
    config = bench.make_config(bench.parse_args(flags))
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size) == shape


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_train_throughput_runs_both_paths_and_writes_json(tmp_path, capsys, optimizer):
    bench = load("train_throughput")
    out = tmp_path / "t.json"
    flags = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(out)]
    bench.main(flags + ["--optimizer", optimizer])
    results = json.loads(out.read_text())
    assert results["optimizer"] == optimizer
    assert (results["config"]["n_layer"], results["config"]["n_embd"]) == (2, 32)
    assert [row["path"] for row in results["rows"]] == ["raw", "lm"]
    assert all(row["tokens_per_sec"] > 0 and row["ms_per_step"] > 0 for row in results["rows"])
    assert "Lightning overhead:" in capsys.readouterr().out
