"""Hugging Face datasets as a `prepare` source, read from local files only.

- `hf:PATH`: a dataset saved with `datasets.save_to_disk` (a `DatasetDict` with splits, or one
  `Dataset`). The train split is `data.hf_train_split`; validation is `data.hf_val_split` when
  the dataset has it, else a `data.val_fraction` of the train documents held out by a hash of
  their index (as for files sources).
- `hf_files:GLOB`: local .parquet, .arrow (Arrow IPC, what `save_to_disk` and the hub write) or
  .jsonl shards. Files are in a split when a folder of their path is named after it or their
  name starts with it (`train-00000-of-00004.parquet`, the hub's layout); with no file in either
  split every file is train and validation is held out as above. Files of other splits (a
  `test-*` shard) are skipped.

The text is `data.text_key`. Documents are read in a fixed order, `BATCH_ROWS` at a time
(datasets memory-map their Arrow files; Parquet is read by row groups), so memory stays bounded
whatever the dataset's size and the prepared bytes do not depend on the worker count. Nothing
is downloaded: a hub name (`hf:openwebtext`) is an error that says to download it first.
"""

from __future__ import annotations

import glob
import os
from typing import Callable, Iterator

from slw_jax import data_spec, errors, parallel_encode
from slw_jax.input_pipeline import CorpusError

BATCH_ROWS = 1024
FILE_SUFFIXES = (".parquet", ".arrow", ".jsonl")
DOWNLOAD_HINT = ("download it first, e.g. datasets.load_dataset(NAME).save_to_disk(DIR) on a "
                 "machine with internet, then pass hf:DIR")


def _datasets():
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # Never reach the hub from here.
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise CorpusError(f"hf: sources need the datasets package ({error}): install "
                      "requirements.txt") from None
  return datasets


# ----- hf:PATH (save_to_disk) ---------------------------------------------------------------------

def load_saved(d):
  """The saved dataset of `data.source=hf:PATH` as {split name: Dataset}, checked: it exists,
  has the train split, and its text key is a string column."""
  _, path = data_spec.split_spec(d.source, "")
  if not os.path.isdir(path):
    raise CorpusError(f"config.data.source={d.source!r}: no directory {path!r}; a Hugging Face "
                      f"hub name is never downloaded here: {DOWNLOAD_HINT}")
  if not any(os.path.isfile(os.path.join(path, name))
             for name in ("dataset_info.json", "dataset_dict.json")):
    raise CorpusError(f"config.data.source={d.source!r}: {path!r} is not a dataset saved with "
                      "datasets.save_to_disk (no dataset_info.json or dataset_dict.json): "
                      "for parquet, arrow or jsonl files use hf_files:GLOB")
  datasets = _datasets()
  try:
    loaded = datasets.load_from_disk(path)
  except (OSError, ValueError) as error:  # A saved dataset with a shard missing or damaged.
    raise CorpusError(f"config.data.source={d.source!r}: the dataset saved in {path!r} cannot be "
                      f"read: {errors.one_line(error, 200)}") from None
  splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {d.hf_train_split: loaded}
  if d.hf_train_split not in splits:
    raise CorpusError(f"config.data.hf_train_split={d.hf_train_split!r} is not a split of "
                      f"{d.source!r} (it has {', '.join(sorted(splits))})")
  for name in (d.hf_train_split, d.hf_val_split):  # Other splits (test) are never read.
    if name in splits:
      _check_text_column(d, splits[name].features.get(d.text_key), list(splits[name].features))
  return splits


def _check_text_column(d, feature, columns: list[str], where: str = ""):
  where = where or repr(d.source)
  if feature is None:
    raise CorpusError(f"config.data.text_key={d.text_key!r} is not a column of {where} (it has "
                      f"{', '.join(columns) or 'no columns'})")
  dtype = str(getattr(feature, "dtype", feature))
  if dtype not in ("string", "large_string"):
    raise CorpusError(f"config.data.text_key={d.text_key!r} of {where} holds {dtype}, not text")


def _saved_documents(d, splits: dict, on_read) -> Iterator[tuple[str, str, str]]:
  """(split, name, text) of a saved dataset; name = 'SPLIT/INDEX' decides a held-out split."""
  chosen = [d.hf_train_split] + ([d.hf_val_split] if d.hf_val_split in splits else [])
  for split_name in chosen:
    dataset = splits[split_name].select_columns([d.text_key]).with_format("arrow")
    index = 0
    for table in dataset.iter(batch_size=BATCH_ROWS):
      on_read(table.nbytes)
      for text in table.column(d.text_key).to_pylist():
        yield split_name, f"{split_name}/{index}", text
        index += 1


# ----- hf_files:GLOB ------------------------------------------------------------------------------

def source_files(pattern: str) -> list[str]:
  return [p for p in sorted(glob.glob(pattern, recursive=True)) if p.endswith(FILE_SUFFIXES)]


def _split_of(relpath: str, split_names: tuple[str, ...]) -> str | None:
  parts = relpath.split(os.sep)
  for name in split_names:
    if name in parts[:-1] or any(parts[-1].startswith(name + sep) for sep in "-_."):
      return name
  return None


def files_by_split(d) -> list[tuple[str | None, str, str]]:
  """(split or None, path, name relative to the glob's folder) of each file to read, in order.
  None: no file is named after a split, so every file is train (validation held out)."""
  _, pattern = data_spec.split_spec(d.source, "")
  paths = source_files(pattern)
  if not paths:
    raise CorpusError(f"config.data.source={d.source!r} matches no {', '.join(FILE_SUFFIXES)} "
                      "file")
  base = data_spec.glob_base(pattern)
  names = [(p, os.path.relpath(p, base)) for p in paths]
  wanted = (d.hf_train_split, d.hf_val_split)
  splits = [_split_of(name, wanted) for _, name in names]
  if not any(splits):
    return [(None, p, name) for p, name in names]
  if d.hf_train_split not in splits:
    raise CorpusError(f"config.data.source={d.source!r} has files of split "
                      f"{d.hf_val_split!r} but none of config.data.hf_train_split="
                      f"{d.hf_train_split!r}")
  return [(s, p, name) for s, (p, name) in zip(splits, names) if s is not None]


def _arrow_batches(path: str):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  try:
    reader = pa.ipc.open_stream(pa.memory_map(path))
  except pa.ArrowInvalid:
    reader = pa.ipc.open_file(pa.memory_map(path))
    return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
  return reader.schema, iter(reader)


def _table_batches(path: str, text_key: str):
  """(schema, record batches of `text_key`) of a parquet or arrow file."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    if path.endswith(".parquet"):
      parquet = pq.ParquetFile(path)
      schema = parquet.schema_arrow
      batches = (parquet.iter_batches(batch_size=BATCH_ROWS, columns=[text_key])
                 if text_key in schema.names else iter(()))
      return schema, batches
    return _arrow_batches(path)
  except (pa.ArrowInvalid, OSError) as error:
    raise CorpusError(f"{path} is not a readable {os.path.splitext(path)[1]} file: "
                      f"{' '.join(str(error).split())[:200]}") from None


def check_files(d):
  """Every parquet / arrow file has a string column `data.text_key` (reads only schemas)."""
  for _, path, _ in files_by_split(d):
    if path.endswith(".jsonl"):
      continue  # Checked line by line when read (a worker decodes each line).
    schema, _ = _table_batches(path, d.text_key)
    field = schema.field(d.text_key) if d.text_key in schema.names else None
    _check_text_column(d, None if field is None else field.type, schema.names, path)


def _file_documents(d, files: list, on_read
                    ) -> Iterator[tuple[str | None, str, parallel_encode.Document]]:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  for split, path, name in files:
    if path.endswith(".jsonl"):
      for doc_name, line in parallel_encode.jsonl_documents(path, name, d.text_key, on_read):
        yield split, doc_name, line
      continue
    _, batches = _table_batches(path, d.text_key)
    row = 0
    try:
      for batch in batches:
        on_read(batch.nbytes)
        for text in batch.column(batch.schema.get_field_index(d.text_key)).to_pylist():
          yield split, f"{name}:{row}", text
          row += 1
    except (pa.ArrowInvalid, OSError) as error:  # A damaged page or record batch.
      raise CorpusError(f"{path} is damaged after row {row}: "
                        f"{' '.join(str(error).split())[:200]}") from None


# ----- both ---------------------------------------------------------------------------------------

def check_source(d):
  """The one-line CorpusError of a bad hf: or hf_files: source, before any tokenizing."""
  kind, _ = data_spec.split_spec(d.source, "")
  if kind == "hf":
    load_saved(d)
  else:
    check_files(d)


def source_bytes(d) -> int:
  """The bytes of the source's files (the progress line's ETA)."""
  kind, _ = data_spec.split_spec(d.source, "")
  if kind == "hf":
    return sum(os.path.getsize(f["filename"])
               for dataset in load_saved(d).values() for f in dataset.cache_files)
  return sum(os.path.getsize(path) for _, path, _ in files_by_split(d))


def tagged_documents(d, is_validation: Callable[[str, float], bool], on_read
                     ) -> Iterator[tuple[str, parallel_encode.Document]]:
  """("train" | "validation", document) in a fixed order; documents of a dataset without a
  validation split are held out by `is_validation(name, data.val_fraction)`."""
  kind, _ = data_spec.split_spec(d.source, "")
  if kind == "hf":  # The dataset opened, or the files listed, once.
    splits = load_saved(d)
    documents, has_validation = _saved_documents(d, splits, on_read), d.hf_val_split in splits
  else:
    files = files_by_split(d)
    documents = _file_documents(d, files, on_read)
    has_validation = any(s == d.hf_val_split for s, _, _ in files)
  for split, name, text in documents:
    if not text:
      continue
    if has_validation:
      yield ("validation" if split == d.hf_val_split else "train"), text
    else:
      yield ("validation" if is_validation(name, d.val_fraction) else "train"), text
