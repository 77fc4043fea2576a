"""TFDS builders as `Source`s, read without TensorFlow.

Prepared TFDS data is read record by record: array_record / parquet through TFDS's own
`as_data_source`, TFRecord (TFDS's default format) through `jdd.data.tfrecord`. Image features
are not decoded by TFDS (`SkipDecoding`) so that jdd decodes the JPEG bytes itself, at reduced
size when the target is small. Only *preparing* a dataset (`tfds build`) needs TensorFlow.

Labels are read once with one pass over the split; for large splits this label index is saved
(next to the data, else under ~/.cache/jdd) so later runs start instantly.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import re
from typing import Any, Sequence

import numpy as np
import tqdm

from jdd import fingerprint
from jdd.data import sources
from jdd.data import class_names, tfrecord

log = logging.getLogger(__name__)

INDEX_CACHE_MIN_EXAMPLES = 50_000  # below this a label pass takes seconds: not worth a file
_LABEL_CHUNK = 1024
_WNID_NAME = re.compile(r"^(n\d{8})-(.+)$")  # stanford_dogs labels: "n02085620-chihuahua"


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("reading TFDS datasets needs `pip install tensorflow-datasets array_record` "
                          "(TensorFlow itself is not needed to read prepared data)") from e
    return tfds


def _prepare_help(name: str, builder: Any, data_dir: str | None, tfds: Any) -> str:
    root = os.path.abspath(os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR))
    build = (f"pip install tensorflow-cpu && tfds build {name} --data_dir={root} --file_format=array_record"
             " (TensorFlow is needed for this one build step only; jdd reads the result without it)")
    folder = ("Or use an ImageFolder copy instead: name='imagefolder', data_dir=ROOT with "
              "ROOT/{train,val}/<class id>/*.jpg.")
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        manual = os.path.join(root, "downloads", "manual")
        return (f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. It needs a manual download: "
                f"{' '.join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())} Put those files in {manual}, then "
                f"run once: {build}. {folder}")
    return f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Prepare it once: {build}. {folder}"


def _resolve_split(builder: Any, split: str) -> str:
    available = list(builder.info.splits.keys())
    base = split.split("[")[0]
    if not available or base in available:  # no split info yet (unprepared, or TFDS mock data)
        return split
    for alias in sources.SPLIT_ALIASES.get(base, ()):
        if alias in available:
            return alias + split[len(base):]
    raise ValueError(f"split {split!r} not in TFDS dataset {builder.name} at {builder.data_dir}; "
                     f"available: {available}")


def _image_decoders(builder: Any, tfds: Any) -> dict:
    feats = builder.info.features
    return {k: tfds.decode.SkipDecoding() for k, f in feats.items() if isinstance(f, tfds.features.Image)}


class TFRecordExamples(Sequence):
    """Decoded-features view over raw TFRecord records (mirrors TFDS's data sources)."""

    def __init__(self, index: tfrecord.TFRecordIndex, features: Any, decoders: dict):
        self.index, self.features, self.decoders = index, features, decoders

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.features.deserialize_example_np(self.index[i], decoders=self.decoders)


def _needs_tensorflow(err: BaseException) -> bool:
    return isinstance(err, ModuleNotFoundError) and "tensorflow" in str(err)


def _open_records(name: str, builder: Any, split: str, data_dir: str | None, tfds: Any) -> Sequence:
    """A random-access sequence of example dicts whose images are encoded bytes (or arrays)."""
    decoders = _image_decoders(builder, tfds)
    try:
        records = builder.as_data_source(split, decoders=decoders)
    except Exception as e:  # noqa: BLE001 - classified just below
        if not builder.is_prepared():
            raise FileNotFoundError(_prepare_help(name, builder, data_dir, tfds)) from e
        if not isinstance(e, NotImplementedError):
            raise
        # Prepared as TFRecord, which TFDS reads only through tf.data: index the shards ourselves.
        from tensorflow_datasets.core.data_sources import base as tfds_base
        index = _tfrecord_index(builder, split, tfds_base.file_instructions(builder.info, split))
        return TFRecordExamples(index, builder.info.features, decoders)
    if len(records):
        try:
            records[0]
        except Exception as e:  # noqa: BLE001
            if not (decoders and _needs_tensorflow(e)):
                raise
            # Some data sources (TFDS's mock data among them) re-encode images through TensorFlow when
            # asked for undecoded images; let TFDS decode them instead (slower, no draft decoding).
            records = builder.as_data_source(split)
    return records


# ------------------------------------------------------------------------------------------------
# Label / offset index, computed once and saved for large splits
# ------------------------------------------------------------------------------------------------
def _index_paths(builder: Any, split: str, kind: str) -> list[str]:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", split) + f".{kind}.npz"
    data_dir = os.path.abspath(str(builder.data_dir))
    home = os.path.join(os.path.expanduser("~/.cache/jdd/tfds-index"),
                        hashlib.sha256(data_dir.encode()).hexdigest()[:16])
    return [os.path.join(data_dir, "jdd-index", stem), os.path.join(home, stem)]


def _load_index(builder: Any, split: str, kind: str, n: int) -> dict | None:
    for path in _index_paths(builder, split, kind):
        if os.path.isfile(path):
            with np.load(path, allow_pickle=False) as z:
                if int(z["num_examples"]) == n:
                    return {k: z[k] for k in z.files}
            log.warning("ignoring stale index %s (made for another number of examples)", path)
    return None


def _save_index(builder: Any, split: str, kind: str, arrays: dict) -> None:
    for path in _index_paths(builder, split, kind):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
            return
        except OSError as e:  # read-only data directory: try the next place
            log.info("cannot write index %s: %s", path, e)


def _tfrecord_index(builder: Any, split: str, instructions: Sequence) -> tfrecord.TFRecordIndex:
    n = sum(i.take if i.take not in (-1, None) else i.examples_in_shard - i.skip for i in instructions)
    saved = _load_index(builder, split, "tfrecord", n) if n >= INDEX_CACHE_MIN_EXAMPLES else None
    if saved is not None:
        return tfrecord.TFRecordIndex([str(f) for f in saved["files"]], saved["file_ids"], saved["offsets"])
    index = tfrecord.TFRecordIndex.scan(instructions)
    if n >= INDEX_CACHE_MIN_EXAMPLES:
        _save_index(builder, split, "tfrecord", dict(num_examples=n, files=np.asarray(index.files),
                                                     file_ids=index.file_ids, offsets=index.offsets))
    return index


def _read_labels_chunk(records: Sequence, lo: int, hi: int) -> np.ndarray:
    return np.asarray([int(records[j]["label"]) for j in range(lo, hi)], np.int32)


def _read_labels(records: Sequence, name: str) -> np.ndarray:
    """One (threaded) pass over the split reading each example's label: int32 [N]."""
    n = len(records)
    bounds = [(lo, min(lo + _LABEL_CHUNK, n)) for lo in range(0, n, _LABEL_CHUNK)]
    out = np.empty(n, np.int32)
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool, \
            tqdm.tqdm(total=n, desc=f"indexing {name} labels", unit="ex", disable=n < INDEX_CACHE_MIN_EXAMPLES,
                      mininterval=2.0) as bar:
        for (lo, hi), labels in zip(bounds, pool.map(lambda b: _read_labels_chunk(records, *b), bounds)):
            out[lo:hi] = labels
            bar.update(hi - lo)
    return out


def _labels(builder: Any, split: str, records: Sequence) -> np.ndarray:
    n = len(records)
    saved = _load_index(builder, split, "labels", n) if n >= INDEX_CACHE_MIN_EXAMPLES else None
    if saved is not None:
        return saved["labels"].astype(np.int32)
    labels = _read_labels(records, builder.name)
    if n >= INDEX_CACHE_MIN_EXAMPLES:
        _save_index(builder, split, "labels", dict(num_examples=n, labels=labels))
    return labels


# ------------------------------------------------------------------------------------------------
class TfdsSource(sources.Source):
    """A TFDS split (optionally a class subset): example `keep[i]` of the split is image i."""

    def __init__(self, records: Sequence, keep: np.ndarray, **kw):
        self._records, self._keep = records, keep
        super().__init__(**kw)

    def _fetch(self, i: int):
        return self._records[int(self._keep[i])]["image"]

    def _where(self, i: int) -> str:
        return f"{self.location} split {self.split!r} example {int(self._keep[i])}"

    def content_digest(self) -> str:
        """The prepared data as TFDS describes and stores it: dataset_info.json (version, split
        shard lengths and byte counts, checksums) and each data file's name, size and mtime."""
        return prepared_digest(self.location)


def prepared_digest(data_dir: str) -> str:
    """SHA-256 of a prepared TFDS directory: its dataset_info.json and each data file's name, size
    and mtime (jdd's own label index under jdd-index/ excluded)."""
    h = hashlib.sha256()
    info = os.path.join(data_dir, "dataset_info.json")
    if os.path.isfile(info):
        with open(info, "rb") as f:
            h.update(f.read())
    files = sorted(e.path for e in os.scandir(data_dir) if e.is_file() and not e.name.startswith("."))
    return fingerprint.table_digest(fingerprint.file_table(files, data_dir)) + h.hexdigest()[:16]


def _ids_and_names(label_names: list[str]) -> tuple[list[str], list[str]]:
    """Class ids and human names from TFDS label names ("n02085620-chihuahua" splits in two)."""
    matches = [_WNID_NAME.match(s) for s in label_names]
    if all(matches):
        return [m.group(1) for m in matches], [m.group(2).replace("_", " ") for m in matches]
    return list(label_names), class_names.human_names(list(label_names))  # bare wnids get ILSVRC names


def load_tfds(name: str, split: str, *, data_dir: str | None = None, classes=None) -> TfdsSource:
    """Opens a prepared TFDS split; `name` may carry a config ("imagenette/320px-v2")."""
    tfds = _import_tfds()
    data_dir = None if data_dir is None else os.path.expanduser(os.fspath(data_dir))
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"TFDS has no dataset {name!r} (tensorflow-datasets {tfds.__version__})") from e
    missing = {"image", "label"} - set(builder.info.features.keys())
    if missing:
        raise ValueError(f"TFDS dataset {name!r} has no {sorted(missing)} feature (it has "
                         f"{sorted(builder.info.features.keys())}); jdd reads image classification datasets")
    split = _resolve_split(builder, split)
    records = _open_records(name, builder, split, data_dir, tfds)
    label_feature = builder.info.features["label"]
    class_ids, class_names = _ids_and_names(list(label_feature.names))
    all_labels = _labels(builder, split, records)
    picked = sources.resolve_classes(classes, class_ids, class_names)
    remap = np.full(len(class_ids), -1, np.int64)
    remap[picked] = np.arange(len(picked))
    new_labels = remap[all_labels]
    keep = np.flatnonzero(new_labels >= 0)
    return TfdsSource(records, keep, name=name, split=split, labels=new_labels[keep].astype(np.int32),
                      class_ids=[class_ids[k] for k in picked], class_names=[class_names[k] for k in picked],
                      location=str(builder.data_dir))
