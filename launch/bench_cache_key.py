"""Cost of a feature cache's content key: listing an ImageFolder split, one ``stat`` per file, hashing.

    python launch/bench_cache_key.py [--files 10000,100000] [--root /tmp/jdd-key-bench] [--weights DIR]

Writes synthetic ImageFolder trees of empty files (1000 classes) under --root, times each part of
the key (the listing a run does anyway, the stats, the digest) and prints a table with the cost per
file and extrapolated to ImageNet-1k's 1.28M training images. With --weights, also the weight hash of
a checkpoint directory: the first time (reads every byte) and from the index (stats only).
Stat times depend on the file system and on whether its metadata is cached (a second pass is
"warm"); the numbers are for the machine the script runs on.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

from jdd import fingerprint
from jdd.data import sources

IMAGENET_TRAIN = 1_281_167
CLASSES = 1000


def make_tree(root: pathlib.Path, n: int) -> pathlib.Path:
    split = root / f"n{n}" / "train"
    if split.is_dir():
        return root / f"n{n}"
    for c in range(CLASSES):
        d = split / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(n // CLASSES):
            (d / f"img_{i:06d}.JPEG").touch()
    return root / f"n{n}"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", default="10000,100000")
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "jdd-key-bench"))
    p.add_argument("--weights", default="")
    args = p.parse_args()
    rows = []
    for n in [int(x) for x in args.files.split(",")]:
        tree = make_tree(pathlib.Path(args.root), n)
        src, t_list = timed(lambda: sources.load_imagefolder("train", str(tree)))
        files = src._files
        _, t_cold = timed(lambda: fingerprint.file_table(files, src.location))
        table, t_stat = timed(lambda: fingerprint.file_table(files, src.location))
        _, t_hash = timed(lambda: fingerprint.table_digest(table))
        rows.append((len(files), t_list, t_cold, t_stat, t_hash))
    print("| files | listing (s) | stat, 1st pass (s) | stat, 2nd pass (s) | digest (s) | key per file (us) "
          "| key at 1.28M files (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, t_list, t_cold, t_stat, t_hash in rows:
        per = (t_stat + t_hash) / n
        print(f"| {n} | {t_list:.3f} | {t_cold:.3f} | {t_stat:.3f} | {t_hash:.3f} | {per * 1e6:.2f} | "
              f"{per * IMAGENET_TRAIN:.1f} |")
    if args.weights:
        home = tempfile.mkdtemp()
        os.environ["JDD_CACHE_HOME"] = home
        size = sum(os.path.getsize(f) for f in fingerprint.weight_files(args.weights)) / 1e6
        _, first = timed(lambda: fingerprint.weights_digest(args.weights))
        _, again = timed(lambda: fingerprint.weights_digest(args.weights))
        print(f"\nweights {args.weights} ({size:.0f} MB): first hash {first:.2f} s, from the index {again * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
