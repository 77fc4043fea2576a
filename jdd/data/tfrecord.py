"""Random access to TFRecord shards without TensorFlow.

TFDS prepares datasets as TFRecord files by default, and only its array_record format has a
TF-free random-access reader. A TFRecord file is a plain sequence of records

    uint64 length (little endian) | uint32 masked CRC32C of length | data[length] | uint32 CRC of data

so one pass over the 12-byte headers (seeking over the data) gives every record's offset, after
which a record is one positional read. CRCs are not verified: a truncated or foreign file is
caught by the header/length check while indexing, and a corrupt payload fails to parse later.
"""
from __future__ import annotations

import os
import struct
from typing import Sequence

import numpy as np

_HEADER = 12  # uint64 length + uint32 length-CRC
_FOOTER = 4   # uint32 data-CRC


def scan_offsets(path: str) -> np.ndarray:
    """Byte offsets [R] (int64) of the data of every record in one TFRecord file."""
    size = os.path.getsize(path)
    offsets = []
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            header = f.read(_HEADER)
            if len(header) != _HEADER:
                raise ValueError(f"{path}: truncated TFRecord header at byte {pos} (file has {size} bytes)")
            (length,) = struct.unpack("<Q", header[:8])
            end = pos + _HEADER + length + _FOOTER
            if end > size:
                raise ValueError(f"{path}: record at byte {pos} claims {length} bytes, past the end of the "
                                 f"file ({size} bytes): the file is truncated or not a TFRecord file")
            offsets.append(pos + _HEADER)
            pos = end
            f.seek(pos)
    return np.asarray(offsets, np.int64)


def read_record(path: str, offset: int) -> bytes:
    """The data of the record whose data starts at `offset` (its length is in the 8 bytes before the CRC)."""
    with open(path, "rb") as f:
        f.seek(offset - _HEADER)
        (length,) = struct.unpack("<Q", f.read(8))
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path}: short read of {length} bytes at {offset}")
    return data


class TFRecordIndex(Sequence):
    """A random-access sequence of raw records over (file, skip, take) slices of TFRecord shards.

    `files`, `file_ids` and `offsets` fully describe it, so it can be rebuilt from a saved index
    without rescanning (`from_arrays`).
    """

    def __init__(self, files: list[str], file_ids: np.ndarray, offsets: np.ndarray):
        self.files, self.file_ids, self.offsets = files, np.asarray(file_ids, np.int32), np.asarray(offsets)

    @classmethod
    def scan(cls, instructions: Sequence) -> "TFRecordIndex":
        """From TFDS FileInstructions (filename, skip, take, examples_in_shard)."""
        files, file_ids, offsets = [], [], []
        for ins in instructions:
            off = scan_offsets(ins.filename)
            if len(off) != ins.examples_in_shard:
                raise ValueError(f"{ins.filename} holds {len(off)} records, its dataset_info.json says "
                                 f"{ins.examples_in_shard}: the shard is incomplete; re-prepare the dataset")
            take = len(off) - ins.skip if ins.take in (-1, None) else ins.take
            files.append(ins.filename)
            file_ids.append(np.full(take, len(files) - 1, np.int32))
            offsets.append(off[ins.skip:ins.skip + take])
        return cls(files, np.concatenate(file_ids or [np.zeros(0, np.int32)]),
                   np.concatenate(offsets or [np.zeros(0, np.int64)]))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> bytes:
        i = int(i)
        return read_record(self.files[self.file_ids[i]], int(self.offsets[i]))
