"""Results files of an evaluation: ``results.json`` (everything) and ``results.md`` (a table).

Each set is also compared with the real-image references of the same results (or of ``references``,
e.g. another run's baselines read with `load_results`), as DD-Ranking reports improvement over random
real images at the same budget:

- ``gain_over_random`` / ``gain_over_centroid``: top-1 mean minus the reference's, in percentage points;
  only against a reference scored under the same probe mode (full protocol vs features-only).
- ``fraction_of_full``: top-1 mean / the full-dataset probe's top-1 (the ceiling; its own protocol).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

REFERENCES = ("random", "centroid")  # real-image baselines at the same budget
CEILING = "full"                     # the full-dataset probe
DEFINITIONS = {
    "gain_over_random": "top-1 mean minus that of random real images (same ipc, same probe mode), in points",
    "gain_over_centroid": "top-1 mean minus that of the class-centroid real images (same ipc, same probe "
                          "mode), in points",
    "fraction_of_full": "top-1 mean / top-1 of the full-dataset probe",
}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def _mode(r: dict):
    return r.get("protocol", {}).get("mode")


def comparisons(results: dict, references: dict | None = None) -> dict[str, dict]:
    """{name: {"gain_over_random", "gain_over_centroid", "fraction_of_full"}}, each key only when its
    reference is present (in ``results`` first, else in ``references``) and is not the set itself."""
    refs = {**(references or {}), **{k: results[k] for k in (*REFERENCES, CEILING) if k in results}}
    out = {}
    for name, r in results.items():
        c = {}
        for ref in REFERENCES:
            if ref in refs and name != ref and _mode(r) == _mode(refs[ref]):
                c[f"gain_over_{ref}"] = round(r["top1_mean"] - refs[ref]["top1_mean"], 4)
        full = refs.get(CEILING)
        if full is not None and name != CEILING and full["top1_mean"] > 0:
            c["fraction_of_full"] = round(r["top1_mean"] / full["top1_mean"], 4)
        out[name] = c
    return out


def load_results(path: str) -> dict:
    """The {name: result} of a results.json (a file or the directory holding it), e.g. as references."""
    path = os.path.join(path, "results.json") if os.path.isdir(path) else path
    with open(path) as f:
        return json.load(f)["results"]


def write_results(path_dir, results: dict, meta: dict | None = None,
                  references: dict | None = None) -> tuple[str, str]:
    """Writes {name: result dict} to path_dir/results.json and a markdown table results.md; returns paths.

    Each result gains the `comparisons` keys (module doc) in both files, and results.json a top-level
    "comparisons" with their definitions; ``references`` supplies random / centroid / full results from
    elsewhere when ``results`` has none.
    """
    os.makedirs(path_dir, exist_ok=True)
    jpath, mpath = os.path.join(path_dir, "results.json"), os.path.join(path_dir, "results.md")
    comp = comparisons(results, references)
    results = {name: {**r, **comp[name]} for name, r in results.items()}
    used = [k for k in DEFINITIONS if any(k in c for c in comp.values())]
    out = {"meta": meta or {}, "results": results}
    if used:
        out["comparisons"] = {k: DEFINITIONS[k] for k in used}
    with open(jpath, "w") as f:
        json.dump(_jsonable(out), f, indent=1)
    lines = [f"- {k}: {v}" for k, v in (meta or {}).items()]
    lines += [""] if lines else []
    titles = {"gain_over_random": "vs random (pts)", "gain_over_centroid": "vs centroid (pts)",
              "fraction_of_full": "of full"}
    cols = "".join(f" {titles[k]} |" for k in used)
    lines += [f"| method | top-1 (%) | std |{cols} runs | per seed | backbone | protocol | wall (s) |",
              "|---|---|---|" + "---|" * len(used) + "---|---|---|---|---|"]
    for name, r in results.items():
        seeds = r["top1_per_seed"]
        shown = ", ".join(f"{v:.2f}" for v in seeds[:10]) + (", ..." if len(seeds) > 10 else "")
        extra = "".join(f" {_cell(k, r.get(k))} |" for k in used)
        lines.append(f"| {name} | {r['top1_mean']:.2f} | {r['top1_std']:.2f} |{extra} {len(seeds)} | {shown} | "
                     f"{r.get('backbone', '')} | {r['protocol'].get('name', '')} | {r['wall_time_s']:.1f} |")
    if used:
        lines += [""] + [f"{titles[k]}: {DEFINITIONS[k]}." for k in used]
    with open(mpath, "w") as f:
        f.write("\n".join(lines) + "\n")
    return jpath, mpath


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    return f"{100 * value:.1f}%" if key == "fraction_of_full" else f"{value:+.2f}"
