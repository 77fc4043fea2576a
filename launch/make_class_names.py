"""Writes jdd/data/imagenet1k_classes.txt: the 1000 ILSVRC-2012 wnids and a short human name each.

    python launch/make_class_names.py [--info_dir .venv/lib/python3.11/site-packages/timm/data/_info]

Source: the public ImageNet / WordNet metadata that timm ships (`imagenet_synsets.txt`: the 1000
ILSVRC-2012 wnids in label order; `imagenet_synset_to_lemma.txt`: each wnid's WordNet lemmas,
comma-separated). The name is the first lemma, as Imagenette's classes.tsv names its classes
("tench", "English springer"). Two first lemmas are shared by two classes each ("crane", "maillot");
DISAMBIGUATED names them apart, so names are unique and a class can be selected by its name.
"""
from __future__ import annotations

import argparse
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "jdd" / "data" / "imagenet1k_classes.txt"
# wnid -> name where the first lemma is shared (crane: bird / machine; maillot: the second class's
# own second lemma, "tank suit").
DISAMBIGUATED = {"n02012849": "crane (bird)", "n03126707": "crane (machine)", "n03710721": "tank suit"}
HEADER = """\
# The 1000 ImageNet ILSVRC-2012 classes: WordNet id <TAB> short human name, in label (sorted wnid) order.
# Names are the first WordNet lemma of each synset (as Imagenette's classes.tsv), from the public
# ImageNet/WordNet metadata files imagenet_synsets.txt and imagenet_synset_to_lemma.txt shipped in
# timm 1.0.31 (timm/data/_info/). Two first lemmas name two classes each; they are made distinct:
# n02012849 "crane (bird)", n03126707 "crane (machine)", n03710721 "tank suit" (n03710637 stays "maillot").
# Written by launch/make_class_names.py.
"""


def build(info_dir: pathlib.Path) -> list[tuple[str, str]]:
    wnids = [ln.strip() for ln in (info_dir / "imagenet_synsets.txt").read_text().splitlines() if ln.strip()]
    lemmas = dict(ln.split("\t", 1) for ln in (info_dir / "imagenet_synset_to_lemma.txt").read_text().splitlines()
                  if "\t" in ln)
    rows = [(w, DISAMBIGUATED.get(w, lemmas[w].split(",")[0].strip())) for w in wnids]
    names = [n for _, n in rows]
    if len(wnids) != 1000 or len(set(wnids)) != 1000 or wnids != sorted(wnids):
        raise SystemExit(f"expected 1000 unique sorted wnids, got {len(wnids)} ({len(set(wnids))} unique)")
    if len(set(names)) != len(names):
        raise SystemExit(f"names are not unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--info_dir", type=pathlib.Path,
                   default=REPO / ".venv" / "lib" / "python3.11" / "site-packages" / "timm" / "data" / "_info")
    p.add_argument("--out", type=pathlib.Path, default=OUT)
    args = p.parse_args()
    rows = build(args.info_dir)
    args.out.write_text(HEADER + "".join(f"{w}\t{n}\n" for w, n in rows))
    print(f"wrote {len(rows)} classes to {args.out}")


if __name__ == "__main__":
    main()
