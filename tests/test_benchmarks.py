"""The benchmark scripts: they measure the model they were asked for, and run end to end on a tiny one."""

import contextlib
import importlib.util
import json

import pytest
import torch

from tests.conftest import OPTIMIZERS, REPO, needs_muon


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


def rounding_slack(a_ms: float, b_ms: float) -> float:
    """How far a/b - 1 from times rounded to 0.01 ms can be from the same ratio of the exact times (+ the 4-digit
    rounding of the ratio itself)."""
    return 0.005 * (1 / b_ms + a_ms / b_ms**2) + 1e-4


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_train_throughput_runs_both_paths_and_writes_json(tmp_path, capsys, optimizer):
    bench = load("train_throughput")
    out = tmp_path / "t.json"
    flags = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--repeats", "2", "--json", str(out)]
    bench.main(flags + ["--optimizer", optimizer])
    results = json.loads(out.read_text())
    assert results["optimizer"] == optimizer
    assert (results["config"]["n_layer"], results["config"]["n_embd"]) == (2, 32)
    assert [row["path"] for row in results["rows"]] == ["raw", "lm"]
    assert all(row["tokens_per_sec"] > 0 and row["ms_per_step"] > 0 for row in results["rows"])
    # the table's rows are the best of the repeats; each repeat's pair is kept, with its overhead
    repeats = results["repeats_ms_per_step"]
    assert len(repeats) == 2 and len(results["lightning_overhead_per_repeat"]) == 2
    for row in results["rows"]:
        assert row["ms_per_step"] == min(r[row["path"]] for r in repeats)
    paired = [r["lm"] / r["raw"] - 1 for r in repeats]  # from the times rounded to 0.01 ms: a ratio off by up to
    slack = max(rounding_slack(r["lm"], r["raw"]) for r in repeats)  # ~1% at 1 ms steps (a fixed 0.01 flaked)
    assert sorted(results["lightning_overhead_per_repeat"]) == pytest.approx(sorted(paired), abs=slack)
    assert results["lightning_overhead_median"] == pytest.approx(
        sum(results["lightning_overhead_per_repeat"]) / 2, abs=1e-4
    )
    out_text = capsys.readouterr().out
    assert "Lightning overhead:" in out_text and "per repeat: median" in out_text


@pytest.mark.parametrize("peak", [None, 989.4e12], ids=["cpu", "a-known-gpu-peak"])
def test_train_throughput_bare_lightning_path_splits_the_overhead(tmp_path, capsys, monkeypatch, peak):
    """Where the device's peak is known (any GPU in lm's table) lm fit's Throughput callback asks the module for its
    FLOPs per token: the bare module had none, and the path crashed at its first logging step on a GPU."""
    import lm.callbacks

    monkeypatch.setattr(lm.callbacks, "peak_flops", lambda device, dtype: peak)
    bench = load("train_throughput")
    out = tmp_path / "t.json"
    flags = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--repeats", "1", "--bare"]
    bench.main(flags + ["--json", str(out)])
    results = json.loads(out.read_text())
    assert [row["path"] for row in results["rows"]] == ["raw", "bare", "lm"]
    (times,) = results["repeats_ms_per_step"]
    split = results["overhead_split_median"]
    slack = rounding_slack(times["bare"], times["raw"])
    assert split["bare_over_raw"] == pytest.approx(times["bare"] / times["raw"] - 1, abs=slack)
    assert split["lm_over_bare"] == pytest.approx(
        times["lm"] / times["bare"] - 1, abs=rounding_slack(times["lm"], times["bare"])
    )
    assert "bare Lightning over raw" in capsys.readouterr().out


def test_train_throughput_puts_each_path_in_every_place_in_turn(monkeypatch):
    bench = load("train_throughput")
    calls = []
    for loop in ("raw_loop", "bare_lightning_loop", "lightning_loop"):
        monkeypatch.setattr(bench, loop, lambda *args, loop=loop: calls.append(loop) or 0.01)
    result = bench.main(["--size", "tiny", "--device", "cpu", "--repeats", "3", "--bare"])
    raw, bare, lm = "raw_loop", "bare_lightning_loop", "lightning_loop"
    assert calls == [raw, bare, lm, bare, lm, raw, lm, raw, bare]
    assert [row["path"] for row in result["rows"]] == ["raw", "bare", "lm"]  # the table keeps its order
    calls.clear()
    bench.main(["--size", "tiny", "--device", "cpu", "--repeats", "2"])
    assert calls == [raw, lm, lm, raw]


def test_train_throughput_frees_each_compiled_model_before_the_next_path_starts(monkeypatch):
    """A compiled model sits in a reference cycle: without a collection between paths, its weights counted in the
    next path's peak memory (lm's peak on an H200 held the raw loop's 470 MB of parameters)."""
    import gc
    import weakref

    bench = load("train_throughput")
    earlier: list[weakref.ref] = []
    alive_at_start = []

    def path(config, batches, args):
        alive_at_start.append(any(ref() is not None for ref in earlier))
        model, _ = bench.model_and_loss(config, args)  # compiled (lazily: nothing runs, so nothing is traced)
        earlier.append(weakref.ref(model))
        return 0.01

    for loop in ("raw_loop", "lightning_loop"):
        monkeypatch.setattr(bench, loop, path)
    gc.disable()  # no collection by chance in between: the script's own must do it
    try:
        bench.main(["--size", "tiny", "--device", "cpu", "--compile", "--repeats", "2"])
    finally:
        gc.enable()
    assert len(alive_at_start) == 4 and not any(alive_at_start)
    assert len(earlier) == 4


def test_train_throughput_paths_step_with_the_same_learning_rates(monkeypatch):
    """The raw loop and the bare LightningModule run LanguageModel's warm-up and cosine schedule: every path does the
    same work per step."""
    import lm.module
    from lm.optim import build_optimizer

    bench = load("train_throughput")
    seen: dict[str, list[float]] = {}

    def recording(path):
        def build(*args, **kwargs):
            optimizer, summary = build_optimizer(*args, **kwargs)
            lrs = seen.setdefault(path, [])
            optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
            return optimizer, summary

        return build

    monkeypatch.setattr(bench, "build_optimizer", recording("raw"))
    monkeypatch.setattr(lm.module, "build_optimizer", recording("lm"))
    args = bench.parse_args(["--size", "tiny", "--device", "cpu", "--steps", "14", "--warmup", "2"])
    config = bench.make_config(args)
    batches = bench.make_batches(config, args)
    bench.raw_loop(config, batches, args)
    bench.lightning_loop(config, batches, args)
    monkeypatch.setattr(bench, "build_optimizer", recording("bare"))
    bench.bare_lightning_loop(config, batches, args)
    assert len(seen["raw"]) == 16
    assert seen["raw"] == pytest.approx(seen["lm"], rel=1e-6) == seen["bare"]
    assert seen["raw"][0] == pytest.approx(bench.LR / bench.WARMUP_STEPS)  # warming up
    assert seen["raw"][-1] < seen["raw"][bench.WARMUP_STEPS] == pytest.approx(bench.LR, rel=1e-3)  # then decaying


def test_train_throughput_interleave_alternates_raw_and_lm_steps_on_the_same_batches(tmp_path, monkeypatch):
    """--interleave: a raw step, then lm's step on the same batch, in turn; both means over the same step pairs."""
    import lm.module

    bench = load("train_throughput")
    order: list[tuple[str, torch.Tensor]] = []
    raw_call, lm_step = bench.RawStep.__call__, lm.module.LanguageModel.training_step

    def raw(self, i, batch):
        order.append(("raw", batch["input_ids"]))
        return raw_call(self, i, batch)

    def lm_(self, batch, batch_idx):
        order.append(("lm", batch["input_ids"]))
        return lm_step(self, batch, batch_idx)

    monkeypatch.setattr(bench.RawStep, "__call__", raw)
    monkeypatch.setattr(lm.module.LanguageModel, "training_step", lm_)
    out = tmp_path / "t.json"
    flags = ["--size", "tiny", "--device", "cpu", "--steps", "4", "--warmup", "1", "--repeats", "2", "--interleave"]
    result = bench.main(flags + ["--json", str(out)])
    first_fit = order[: len(order) // 2]
    assert [name for name, _ in first_fit] == ["raw", "lm"] * 5
    for (_, raw_ids), (_, lm_ids) in zip(first_fit[::2], first_fit[1::2], strict=True):
        assert torch.equal(raw_ids, lm_ids)
    saved = json.loads(out.read_text())
    assert saved["interleave"] is True and [row["path"] for row in saved["rows"]] == ["raw", "lm"]
    assert len(saved["repeats_ms_per_step"]) == 2  # one fit per repeat, each giving both paths
    assert all(row["ms_per_step"] > 0 for row in result["rows"])


def test_train_throughput_interleave_collects_one_lm_time_per_raw_step_but_the_last(monkeypatch):
    bench = load("train_throughput")
    args = bench.parse_args(["--size", "tiny", "--device", "cpu", "--steps", "5", "--warmup", "2", "--interleave"])
    config = bench.make_config(args)
    batches = bench.make_batches(config, args)
    seen = {}
    interleaved_init = bench._Interleaved.__init__

    def keep(self, *a):
        interleaved_init(self, *a)
        seen["callback"] = self

    monkeypatch.setattr(bench._Interleaved, "__init__", keep)
    seconds = bench.interleaved_loops(config, batches, args)
    callback = seen["callback"]
    assert len(callback.raw_seconds) == 5 and len(callback.lm_seconds) == 4  # the last lm step is not timed
    assert seconds["raw"] == pytest.approx(sum(callback.raw_seconds[:4]) / 4)
    assert seconds["lm"] == pytest.approx(sum(callback.lm_seconds) / 4)


@pytest.mark.parametrize(
    "flags", [["--bare"], ["--device", "cuda"], ["--steps", "1"]]
)  # 1 step: no pair (it divided by 0)
def test_train_throughput_interleave_is_cpu_only_and_without_bare(flags):
    bench = load("train_throughput")
    with pytest.raises(SystemExit):
        bench.parse_args(["--interleave", *flags])


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("train_throughput", ["--steps", "0"]),  # divided None by 0 after a whole lm fit
        ("train_throughput", ["--batch", "0"]),  # a table of 0 tokens/s and a Lightning "overhead"
        ("train_throughput", ["--warmup", "-1"]),
        ("generation", ["--new_tokens", "0"]),  # a table and a "speedup" of no tokens
        ("data_prep", ["--copies", "0"]),  # "holds no text" as a traceback
        ("optimizer_step", ["--repeats", "0"]),
        ("progress_bar", ["--rounds", "0"]),
        ("serve_tasks", ["http://127.0.0.1:1", "--num_problems", "0"]),
    ],
)
def test_a_count_below_its_floor_is_refused_before_the_benchmark_runs(script, argv, capsys):
    entry = load(script)
    with pytest.raises(SystemExit) as exit_info:
        (entry.parse_args if hasattr(entry, "parse_args") else entry.main)(argv)
    assert exit_info.value.code == 2
    flag = next(a for a in argv if a.startswith("--"))
    assert f"argument {flag}: invalid" in capsys.readouterr().err


def test_train_throughput_profile_needs_a_warmup_step():
    """With --warmup 0 the profiler had no warm-up step of its own (torch warned), so the first profiled step carried
    the profiler's start-up and, with --compile, the compilation."""
    bench = load("train_throughput")
    with pytest.raises(SystemExit):
        bench.parse_args(["--profile", "out", "--warmup", "0"])
    assert bench.parse_args(["--profile", "out", "--warmup", "1"]).warmup == 1


def test_train_throughput_refuses_a_gpu_other_than_the_first():
    """Lightning's devices=1 is GPU 0: with --device cuda:1 the raw path trained on GPU 1 and the lm path on GPU 0."""
    bench = load("train_throughput")
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda:1"])
    assert bench.parse_args(["--device", "cuda:0"]).device == "cuda:0"


def test_serve_tasks_asks_for_lm_tasks_eval_s_decoding(monkeypatch):
    """The server fills a missing field from its defaults, lm chat's repetition penalty 1.1 among them: greedy answers
    then differed from lm tasks eval's (22 of 100 on a random tiny model)."""
    import io
    import urllib.request

    bench = load("serve_tasks")
    bodies = []

    class Opener:
        def open(self, request, timeout=None):
            bodies.append(json.loads(request.data))
            reply = {"choices": [{"message": {"content": "0"}}], "usage": {"completion_tokens": 1}}
            return contextlib.closing(io.BytesIO(json.dumps(reply).encode()))

    monkeypatch.setattr(urllib.request, "build_opener", lambda *handlers: Opener())
    bench.main(["http://127.0.0.1:1", "--task", "addition", "--num_problems", "3"])
    assert len(bodies) == 3
    assert all(b["temperature"] == 0 and b["repetition_penalty"] == 1.0 for b in bodies)
    # and its budget: evaluate_task's, with the task recipes' char tokenizer (a fixed 8 was one more for 2 digits)
    from lm.tasks import make_problems
    from lm.tokenizer import build_tokenizer

    problems = make_problems("addition", "test", 3, seed=0)
    char = build_tokenizer("char", texts=lambda: [p.question + p.answer for p in problems])
    assert {b["max_tokens"] for b in bodies} == {max(len(char.encode(p.answer)) for p in problems) + 4}


@needs_muon
def test_optimizer_step_times_lm_and_torch_muon_on_the_same_parameters(tmp_path, capsys):
    bench = load("optimizer_step")
    out = tmp_path / "o.json"
    bench.main(
        ["--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(out)]
    )
    results = json.loads(out.read_text())
    assert list(results["ms_per_step"]) == ["adamw", "muon", "muon_torch"]  # the flag row is for a GPU
    assert all(ms > 0 for ms in results["ms_per_step"].values())
    ops = results["ops_per_step"]
    assert ops["muon"] < ops["muon_torch"] / 3  # tiny's 14 hidden matrices come in 3 shapes
    model = bench.make_model(bench.parse_args(["--size", "tiny", "--device", "cpu"]))
    ours, theirs = bench.make_optimizer(model, "muon"), bench.make_optimizer(model, "muon_torch")
    assert type(theirs.muon) is torch.optim.Muon and type(ours.muon) is not type(theirs.muon)
    assert theirs.muon.param_groups[0]["params"] == ours.muon.param_groups[0]["params"]  # same matrices
    assert theirs.muon.defaults == ours.muon.defaults  # same settings
    assert "muon_torch" in capsys.readouterr().out


def test_progress_bar_benchmark_times_every_setting_against_no_bar(tmp_path):
    bench = load("progress_bar")
    out = tmp_path / "p.json"
    bench.main(["--size", "tiny", "--steps", "2", "--warmup", "1", "--rounds", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [row["setting"] for row in rows] == list(bench.SETTINGS)
    assert rows[0]["median_over_none"] == 0 and all(row["best_ms_per_step"] > 0 for row in rows)
    assert len(result["rounds_ms_per_step"]) == 2
    assert list(result["rounds_ms_per_step"][1])[0] == list(bench.SETTINGS)[1]  # the second round starts one further on


def test_train_throughput_lm_path_runs_on_the_trainer_lm_fit_builds(tmp_path, monkeypatch):
    """The lm path carried only a throughput timer, where `lm fit` runs ten callbacks (each hook of a step is
    dispatched to every one), its checkpoint IO and its replacements: it now takes the Trainer lm's CLI builds."""
    from lm.__main__ import LMCLI

    class Built(LMCLI):
        def _run_subcommand(self, subcommand):
            pass

    monkeypatch.chdir(tmp_path)
    fit = Built(args=["fit", "--config", str(REPO / "experiments/debug.yaml"), "--trainer.logger", "false",
                      "--trainer.enable_progress_bar", "false"]).trainer  # fmt: skip
    bench = load("train_throughput")
    args = bench.parse_args(["--size", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "1"])
    trainer = bench.lm_fit_trainer(args, 4, str(tmp_path / "bench"))
    assert [type(c) for c in trainer.callbacks] == [type(c) for c in fit.callbacks]
    assert type(trainer.strategy.checkpoint_io) is type(fit.strategy.checkpoint_io)
    assert trainer.max_steps == 4 and trainer.gradient_clip_val == 1.0 and trainer.logger is None
    built, used = bench.lm_fit_trainer, []

    def recording(*a):
        used.append(built(*a))
        return used[-1]

    monkeypatch.setattr(bench, "lm_fit_trainer", recording)
    config = bench.make_config(args)
    bench.lightning_loop(config, bench.make_batches(config, args), args)
    assert len(used) == 1 and used[0].global_step == 4  # the path trained on it
