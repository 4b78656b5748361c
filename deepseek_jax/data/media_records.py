"""Interleaved media records: which records a data config names, their train / validation split, reading one.

A record is one JSONL line, or one ArrayRecord record holding the same JSON bytes:

    {"segments": [{"text": "Which digit?", "loss": false}, {"image": "imgs/3.png"}, {"text": " 3"}]}

(segment keys and media paths: media/encode.py; paths are relative to the record file's folder).
`data.source` is a file, directory or glob as for text (sources.py). With `data.format: auto` the records
are the *.jsonl and *.array_record files (a directory's other files are the media they reference); an
explicit format makes every listed file a record file of that format. `demo_media` is the built-in demo's
folder (`data.demo_media.demo_records`, written once into a cache directory).

Split: a record named "<file relative to the source root>:<n>" (JSONL: line number from 1; ArrayRecord:
record index from 0) is in validation iff the sha1 fraction of its name < val_fraction, the text rule. A
source laid out as split files (record files or folders named `train` and `validation` at its root, both
present) is split by those names instead (other record files are then unused). Listing reads no
record: a line that is not valid JSON is a DataError naming "file:line" when it is read (or a counted
skip, data.media.skip_bad_records).
"""

import json
from collections.abc import Sequence
from pathlib import Path

import grain

from deepseek_jax.config import DataConfig, ModelConfig
from deepseek_jax.config.run import DEMO_SOURCE
from deepseek_jax.data.sources import SPLITS, _files, _hash_fraction
from deepseek_jax.tokenizer import DataError

RECORD_FORMATS = {".jsonl": "jsonl", ".array_record": "array_record"}


class Records(Sequence):
    """Lazy random-access records: item i = (name, raw JSON bytes, folder its media paths are relative to);
    `refs[i]` = (path, format, line byte offset | record index)."""

    def __init__(self, refs: list[tuple[str, str, int]], names: list[str]):
        self.refs, self.names = refs, names
        self._readers: dict = {}

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[str, bytes, str]:
        path, fmt, loc = self.refs[i]
        if fmt == "jsonl":
            with open(path, "rb") as f:
                f.seek(loc)
                raw = f.readline()
        else:
            if path not in self._readers:
                self._readers[path] = grain.sources.ArrayRecordDataSource([path])
            raw = self._readers[path][loc]
        return self.names[i], raw, str(Path(path).parent)

    def __getstate__(self):  # array_record readers are reopened in each worker process
        return {**self.__dict__, "_readers": {}}


def parse_record(raw: bytes, name: str) -> dict:
    """A record's JSON object; DataError naming the record when it is not {"segments": [...]}."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"record {name} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or not isinstance(record.get("segments"), list):
        raise DataError(f'record {name} must be a JSON object with a "segments" list')
    return record


def source_root(cfg: DataConfig, model: ModelConfig | None) -> str:
    """`cfg.source`, or for `demo_media` the folder the demo's records are written to (the demo's cache,
    `demo_media.default_cache_dir`)."""
    if cfg.source != DEMO_SOURCE:
        return cfg.source
    if model is None:
        raise DataError(f"data.source {DEMO_SOURCE!r} needs the model config (its modalities and placeholder ids)")
    from deepseek_jax.data.demo_media import demo_records  # lazy: the demo imports scikit-learn when writing

    return str(demo_records(model))


def list_records(cfg: DataConfig, split: str, model: ModelConfig | None = None) -> Records:
    """The split's records in source order (sorted paths, then line / record order)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    source = source_root(cfg, model)
    root, files = _files(source)
    if cfg.format == "text":
        raise DataError("data.format 'text' cannot hold media records (data.media): use auto, jsonl or array_record")
    fmts = [cfg.format if cfg.format != "auto" else RECORD_FORMATS.get(p.suffix) for p in files]
    files, fmts = [p for p, f in zip(files, fmts) if f], [f for f in fmts if f]
    if not files:
        raise DataError(f"data.source {source!r}: no record files (*.jsonl, *.array_record)")
    by_name = _split_by_name(root, files)
    refs, names = [], []
    for path, fmt in zip(files, fmts):
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        in_split = (by_name[path] == split) if by_name else None
        for loc, n in _locations(path, fmt):
            name = f"{rel}:{n}"
            if in_split is None:
                keep = (_hash_fraction(name) < cfg.val_fraction) == (split == "validation")
            else:
                keep = in_split
            if keep:
                refs.append((str(path), fmt, loc))
                names.append(name)
            if cfg.max_documents and len(refs) == cfg.max_documents:
                return Records(refs, names)
    if not refs:
        how = "add records to its split files" if by_name else "add records or change data.val_fraction"
        raise DataError(f"the {split} split of data.source {source!r} holds no records; {how}")
    return Records(refs, names)


def _split_by_name(root: Path, files: list[Path]) -> dict[Path, str]:
    """{file: split} when the root holds record files or folders named `train` and `validation`, else {}."""
    tops = {}
    for p in files:
        rel = p.relative_to(root).parts if p.is_relative_to(root) else ()
        top = rel[0] if len(rel) > 1 else Path(rel[0]).stem if rel else ""
        tops[p] = top if top in SPLITS else None
    if set(SPLITS) <= set(tops.values()):
        return {p: t for p, t in tops.items()}
    return {}


def _locations(path: Path, fmt: str):
    """(location, number) of each record: JSONL non-blank lines (byte offset, line number from 1);
    ArrayRecord records (index, index)."""
    if fmt == "jsonl":
        offset = 0
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield offset, n
                offset += len(line)
        return
    try:
        n = len(grain.sources.ArrayRecordDataSource([str(path)]))
    except Exception as e:  # noqa: BLE001 (riegeli raises plain RuntimeError/ValueError)
        raise DataError(f"{path} is not an array_record file: {e}") from None
    yield from ((i, i) for i in range(n))


class RecordTexts(Sequence):
    """Each record's text segments joined, by index, with the records' names (tokenizer training and
    the unigram baseline sample them like documents); an unreadable record reads as ""."""

    def __init__(self, records: Records):
        self.records, self.names = records, records.names

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> str:
        name, raw, _ = self.records[i]
        try:
            segments = parse_record(raw, name)["segments"]
        except DataError:
            return ""
        return "".join(s["text"] for s in segments if isinstance(s, dict) and isinstance(s.get("text"), str))
