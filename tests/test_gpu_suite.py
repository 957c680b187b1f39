"""benchmarks/gpu_suite.sh without a GPU: every phase runs its commands (bash mistakes, unset variables, a phase
that calls nothing), every `lm fit` command line parses (override keys, values, class paths) and builds its model
config, every benchmark command line parses, and a variant's summary line comes from real `lm fit` output.

The GPU is lent rarely and for minutes: a wrong key in a phase that has never run would waste them."""

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SUITE = REPO / "benchmarks" / "gpu_suite.sh"
PHASES = re.findall(r"^phase_(\w+)\(\)", SUITE.read_text(), re.M)

# Stand-ins on PATH: python3 records its arguments (NUL-separated, one file per process), timeout records its limit
# and runs the command (exec keeps the PID, pairing the limit with the call), nvidia-smi names a GPU.
FAKE_PYTHON = """#!/bin/bash
printf '%s\\0' "$@" > "$SUITE_CALLS/$$.argv"
[[ $1 == -c ]] && echo "fake python"
exit 0
"""
FAKE_TIMEOUT = """#!/bin/bash
printf '%s' "$1" > "$SUITE_CALLS/$$.limit"
shift
exec "$@"
"""
FAKE_NVIDIA_SMI = "#!/bin/sh\necho 'FAKE GPU, 0, 1 MiB'\n"


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def run_phase(tmp_path: Path, phase: str, python: str | None = None, data: str = "data.txt", deadline: int = 100000):
    """Runs `PHASES=phase` of the suite with the stand-ins; returns (completed process, calls as (argv, limit))."""
    bin_dir, calls_dir, out = tmp_path / "bin", tmp_path / f"calls_{phase}", tmp_path / f"out_{phase}"
    bin_dir.mkdir(exist_ok=True)
    calls_dir.mkdir()
    fake_python = _write_exe(bin_dir / "python3", FAKE_PYTHON)
    _write_exe(bin_dir / "timeout", FAKE_TIMEOUT)
    _write_exe(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": python or str(fake_python),
        "PHASES": phase,
        "DEADLINE": str(deadline),
        "SUITE_CALLS": str(calls_dir),
    }
    done = subprocess.run(
        ["bash", str(SUITE), data, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    calls = []
    for argv_file in sorted(calls_dir.glob("*.argv")):
        argv = argv_file.read_text().split("\0")[:-1]
        limit_file = argv_file.with_suffix(".limit")
        calls.append((argv, limit_file.read_text() if limit_file.exists() else None))
    return done, [c for c in calls if c[0][:1] != ["-c"]], out


def test_suite_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SUITE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def phase_calls(tmp_path_factory):
    """Each phase run alone with the stand-ins: {phase: (completed process, calls, out dir)}."""
    tmp = tmp_path_factory.mktemp("suite")
    return {phase: run_phase(tmp, phase) for phase in PHASES}


def test_every_phase_runs_its_commands_under_a_time_limit(phase_calls):
    assert {"time", "throughput", "variants", "variants8", "cdtuning", "actckpt", "optstep"} <= set(PHASES)
    for phase, (done, calls, _) in phase_calls.items():
        # stderr catches `command not found`, unbound variables (set -u), bad substitutions, grep on missing files
        assert done.returncode == 0 and not done.stderr, (phase, done.stderr)
        assert calls, f"phase {phase} ran no command"
        for argv, limit in calls:
            assert limit is not None and limit.isdigit() and int(limit) >= 1, (phase, argv, limit)


def test_a_misspelt_phase_stops_the_suite_before_any_phase_runs(tmp_path):
    """It printed `command not found` and went on: the GPU time went to the other phases, the one wanted never ran."""
    done, calls, out = run_phase(tmp_path, "throughput variant8")
    assert done.returncode == 2 and "no phase 'variant8'" in done.stderr
    assert not calls and not (out / "summary.txt").exists()


def test_deadline_caps_every_limit_and_skips_what_no_longer_fits(tmp_path):
    _, calls, _ = run_phase(tmp_path, "variants8", deadline=100)
    assert calls and all(1 <= int(limit) <= 100 for _, limit in calls)
    done, calls, out = run_phase(tmp_path, "throughput", deadline=20)
    assert not calls and "throughput: skipped, past the deadline" in (out / "summary.txt").read_text()


def test_runs_of_a_phase_write_to_their_own_files(phase_calls):
    """Side-by-side variants sharing a root would mix their CSV logs; two throughput phases one JSON."""
    roots, outputs = [], []
    for argv, _ in (c for _, calls, _ in phase_calls.values() for c in calls):
        for flag, seen in (("--trainer.default_root_dir", roots), ("--json", outputs)):
            if flag in argv:
                seen.append(argv[argv.index(flag) + 1].split("/out_", 1)[1].split("/", 1)[1])  # under OUT
    assert len(roots) == len(set(roots)), sorted(r for r in roots if roots.count(r) > 1)
    assert len(outputs) == len(set(outputs)), sorted(o for o in outputs if outputs.count(o) > 1)


def _lm_fit_parser():
    """lm fit's parser, as `lm fit` builds it (no training, nothing instantiated)."""
    import jsonargparse

    import lm.__main__ as lm_main

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=False)  # as lm fit without --help

    class Parsed(Exception):
        pass

    class ParserOnly(lm_main.LMCLI):
        def parse_arguments(self, parser, args):
            raise Parsed(parser)

    try:
        ParserOnly(args=["fit"])
    except Parsed as e:
        return e.args[0]
    raise AssertionError("LMCLI never parsed")


def _as_dict(value) -> dict:
    return value.as_dict() if hasattr(value, "as_dict") else dict(value or {})


# A variant's name says what it changes: each part must be what its run resolves to. Catches a value that does not
# match its name, and an override array misspelt in bash: "${bst[@]}" expands to nothing, even under set -u.
def _name_parts(config) -> dict:
    arch, init = _as_dict(config.model.init_args.arch), config.model.init_args
    callbacks = [c.class_path for c in config.trainer.callbacks or []]
    return {
        r"ctx(\d+)": lambda v: arch["block_size"] == int(v),
        r"b(\d+)": lambda v: config.data.init_args.batch_size == int(v),
        r"(\d+)layer": lambda v: arch["n_layer"] == int(v),
        r"(\d+x\d+)": lambda v: [arch["n_layer"], arch["n_embd"]] == [int(x) for x in v.split("x")],
        r"w(\d+)": lambda v: arch["n_embd"] == int(v),
        r"wd([\d.]+)": lambda v: init.weight_decay == float(v),
        r"drop([\d.]+)": lambda v: arch["dropout"] == float(v),
        r"lr([\d.e-]+)": lambda v: init.lr == float(v),
        r"minlr([\d.]+)": lambda v: init.min_lr_ratio == float(v),
        r"(\d{3,})": lambda v: config.trainer.max_steps == int(v),
        r"(muon)": lambda v: init.optimizer == "muon",
        r"(ema)": lambda v: "lm.callbacks.EMA" in callbacks,
        r"seed(\d+)": lambda v: config.seed_everything == int(v),
        r"(best)": lambda v: _is_the_best_recipe(config),
    }


def _is_the_best_recipe(config) -> bool:
    """experiments/shakespeare_char_best_val.yaml's shape, context, batch and weight decay."""
    import yaml

    best = yaml.safe_load((REPO / "experiments" / "shakespeare_char_best_val.yaml").read_text())
    arch, best_arch = _as_dict(config.model.init_args.arch), best["model"]["init_args"]["arch"]
    return all(arch[k] == best_arch[k] for k in ("n_layer", "n_head", "n_embd", "block_size")) and (
        config.model.init_args.weight_decay == best["model"]["init_args"]["weight_decay"]
        and config.data.init_args.batch_size == best["data"]["init_args"]["batch_size"]
    )


def _check_name(root: str, config) -> None:
    name = Path(root).name
    parts = name.split("_")
    for part in parts[1:] if re.fullmatch(r"r\d+", parts[0]) else parts:  # r8_...: the round
        rules = [(pattern, check) for pattern, check in _name_parts(config).items() if re.fullmatch(pattern, part)]
        assert rules, f"variant {name}: no rule for the part {part!r} of its name"
        for pattern, check in rules:
            assert check(re.fullmatch(pattern, part).group(1)), f"variant {name}: its config is not {part!r}"


@pytest.mark.slow
def test_every_lm_fit_command_line_parses_and_builds_its_model_config(phase_calls, monkeypatch):
    from lm.config import GPTConfig

    monkeypatch.chdir(REPO)  # the suite runs from the checkout: --config experiments/...
    parser = _lm_fit_parser()
    fits = [(p, a[2:]) for p, (_, calls, _) in phase_calls.items() for a, _ in calls if a[:3] == ["-m", "lm", "fit"]]
    assert len(fits) > 40
    for phase, argv in fits:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                config = parser.parse_args(argv).fit
        except SystemExit:
            pytest.fail(f"{phase}: {' '.join(argv)}\n{err.getvalue()}")
        GPTConfig(**_as_dict(config.model.init_args.arch))  # n_embd divisible by n_head, head size even for RoPE, ...
        for callback in config.trainer.callbacks or []:  # EMA(decay=...) and the like check their values
            module, _, name = callback.class_path.rpartition(".")
            getattr(importlib.import_module(module), name)(**_as_dict(callback.init_args))
        root = argv[argv.index("--trainer.default_root_dir") + 1]
        if Path(root).parent.name == "variants":
            _check_name(root, config)


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"suite_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Parsed(Exception):
    pass


def test_every_benchmark_command_line_parses(phase_calls, monkeypatch):
    from lm.config import SIZES

    benchmarks = {name: _load_benchmark(name) for name in ("train_throughput", "optimizer_step", "generation")}

    def parsed_generation(size, **_):
        assert size in SIZES
        raise _Parsed

    monkeypatch.setattr(benchmarks["generation"], "get_config", parsed_generation)
    seen = set()
    for phase, (_, calls, _) in phase_calls.items():
        for argv, _ in calls:
            if argv[0] == "-m":
                continue
            name = Path(argv[0]).stem
            seen.add(name)
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    if name == "generation":  # parses inside main(): stop it at the model
                        monkeypatch.setattr(sys, "argv", argv)
                        with pytest.raises(_Parsed):
                            benchmarks[name].main()
                    else:
                        benchmarks[name].parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{phase}: {' '.join(argv)}\n{err.getvalue()}")
    assert seen == set(benchmarks)


@pytest.mark.slow
def test_a_variant_summary_reads_real_lm_fit_output(tmp_path):
    """One variant of a round trains for real (shrunk: tiny model, 2 steps, CPU), and the suite's summary finds its
    validations in the log the suite wrote: the line it greps for is what lm fit prints, where it prints it."""
    text = "".join(f"{chr(97 + i % 26)}{' ' if i % 7 else chr(10)}" for i in range(20000))
    (tmp_path / "data.txt").write_text(text)
    shrink = (
        "--model.init_args.arch.n_layer 1 --model.init_args.arch.n_head 2 --model.init_args.arch.n_embd 16 "
        "--model.init_args.arch.block_size 16 --data.init_args.batch_size 2 --model.init_args.compile false "
        "--trainer.accelerator cpu --trainer.precision 32-true --trainer.max_steps 2 --trainer.val_check_interval 1 "
        "--trainer.limit_val_batches 1 --trainer.enable_model_summary false"
    )
    # the first lm fit of the phase runs, the others (side by side in the suite) record only
    wrapper = _write_exe(
        tmp_path / "one_real_python",
        f"""#!/bin/bash
if [[ "$1 $2 $3" == "-m lm fit" ]] && mkdir "$SUITE_CALLS/real" 2>/dev/null; then
  exec {sys.executable} "$@" {shrink}
fi
exec "$(dirname "$0")/bin/python3" "$@"
""",
    )
    phase = PHASES[-1] if PHASES[-1].startswith("variants") else "variants"
    done, _, out = run_phase(tmp_path, phase, python=str(wrapper), data=str(tmp_path / "data.txt"))
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, done.stderr
    found = re.findall(
        r"^variant_\S+: step [12]: val/loss [0-9.]+, [0-9.]+ s since launch, last: step 2: val/loss [0-9.]+, "
        r"[0-9.]+ s since launch, lm fit exit 0$",
        summary,
        re.M,
    )
    assert len(found) == 1, summary
