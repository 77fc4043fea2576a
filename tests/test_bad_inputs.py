"""Bad inputs through the CLI entry point (issue 16): each one exits with status 2, prints one line
``jdd: error: ...`` naming the key or the path at fault (no traceback), and leaves the workdir as it
was (absent, or unchanged).

Every case is a fresh ``python -m jdd.main`` process on tests/configs/tiny.py and a generated
ImageFolder tree. The processes start together (a few at a time) in one module fixture, since each
spends most of its ~2-4 s importing; the parametrized tests then check one result each.
"""
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

from conftest import make_imagefolder

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "tests/configs/tiny.py"
PARALLEL = 4
TIMEOUT_S = 240
LOCK_HOLDER = """
import sys, time
from jdd import workdir
with workdir.lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@dataclasses.dataclass
class Case:
    name: str
    args: Callable[[dict], list]      # paths -> extra CLI arguments (besides --workdir)
    expect: Callable[[dict], list]    # paths -> fragments the last stderr line must contain
    data: str = "data"                # which data root the config's data= argument names
    workdir: str | None = None        # a path key of a prepared workdir (default: a fresh absent one)
    needs: str | None = None          # a fixture this case needs ("lock", "ro")


def _cfg(p, arg=""):
    return f"--config={TINY}:data={p['data']}" + (f",{arg}" if arg else "")


CASES = [
    Case("steps=-1", lambda p: [_cfg(p), "--config.steps=-1"], lambda p: ["--config.steps=-1", "steps must be"]),
    Case("syn.lr=-1", lambda p: [_cfg(p), "--config.syn.lr=-1"], lambda p: ["--config.syn.lr=-1.0", "(0, 1]"]),
    Case("syn.lr=1e30", lambda p: [_cfg(p), "--config.syn.lr=1e30"], lambda p: ["--config.syn.lr=1e+30", "(0, 1]"]),
    Case("syn.lr=nan", lambda p: [_cfg(p), "--config.syn.lr=nan"], lambda p: ["--config.syn.lr=nan", "finite"]),
    Case("syn.lr=abc", lambda p: [_cfg(p), "--config.syn.lr=abc"], lambda p: ["--config.syn.lr=abc"]),
    Case("syn.ipc=0", lambda p: [_cfg(p), "--config.syn.ipc=0"], lambda p: ["--config.syn.ipc=0", ">= 1"]),
    Case("copies=0", lambda p: [_cfg(p), "--config.augment.copies=0"], lambda p: ["--config.augment.copies=0"]),
    Case("seed=-1", lambda p: [_cfg(p), "--config.seed=-1"], lambda p: ["--config.seed=-1"]),
    Case("eval.epochs=0", lambda p: [_cfg(p), "--config.eval.epochs=0"], lambda p: ["--config.eval.epochs=0"]),
    Case("unknown method", lambda p: [_cfg(p), "--config.method_name=sgdd"],
         lambda p: ["--config.method_name='sgdd'", "'clp'"]),
    Case("unknown method (config arg)", lambda p: [_cfg(p, "method=sgdd")],
         lambda p: [f"{_cfg(p, 'method=sgdd')}: unknown distillation method 'sgdd'"]),
    Case("unknown backbone family", lambda p: [_cfg(p), "--config.backbone.spec=random:resnet/test"],
         lambda p: ["--config.backbone.spec='random:resnet/test'", "unknown backbone family 'resnet'"]),
    Case("unknown --config.foo", lambda p: [_cfg(p), "--config.foo=1"], lambda p: ["unknown config key 'foo'"]),
    Case("unknown --config.syn.lrr", lambda p: [_cfg(p), "--config.syn.lrr=0.1"],
         lambda p: ["unknown config key 'syn.lrr'", "did you mean --config.syn.lr?"]),
    Case("unknown config argument", lambda p: [_cfg(p, "bogus=1")], lambda p: ["unknown config argument 'bogus'"]),
    Case("missing config file", lambda p: ["--config=tests/configs/nope.py"], lambda p: ["tests/configs/nope.py"]),
    Case("missing data dir", lambda p: [_cfg(p)],
         lambda p: [f"no ImageFolder tree at {p['missing']}", "does not exist"], data="missing"),
    Case("misspelled data dir", lambda p: [_cfg(p)], lambda p: [f"no ImageFolder tree at {p['typo']}",
                                                                f"did you mean {p['images']}?"], data="typo"),
    Case("data dir without train/", lambda p: [_cfg(p)], lambda p: [f"no ImageFolder tree at {p['no_train']}",
                                                                    "no train/"], data="no_train"),
    Case("data dir without train/ (TFDS config)",
         lambda p: [f"--config=configs/imagenette_dinov2s_clp.py:data={p['no_train']},backbone=random:dinov2/test"],
         lambda p: [f"no ImageFolder tree at {p['no_train']}"], data="no_train"),
    Case("workdir is a file", lambda p: [_cfg(p)], lambda p: [f"--workdir {p['file']} is a file"], workdir="file"),
    Case("workdir under a file", lambda p: [_cfg(p)], lambda p: [f"{p['file']} is a file, not a directory"],
         workdir="under_file"),
    Case("non-writable workdir", lambda p: [_cfg(p)], lambda p: [str(p["ro"]), "is not writable"], workdir="ro_run",
         needs="ro"),
    Case("truncated model.safetensors", lambda p: [_cfg(p), f"--config.backbone.spec={p['bb_trunc']}"],
         lambda p: [f"{p['bb_trunc']}/model.safetensors", "damaged or truncated"]),
    Case("malformed config.json", lambda p: [_cfg(p), f"--config.backbone.spec={p['bb_json']}"],
         lambda p: [f"{p['bb_json']}/config.json", "not valid JSON"]),
    Case("missing backbone dir", lambda p: [_cfg(p), f"--config.backbone.spec={p['missing']}/ckpt"],
         lambda p: ["--config.backbone.spec=", f"{p['missing']}/ckpt", "does not exist"]),
    Case("image size not divisible by patch", lambda p: [_cfg(p), "--config.data.crop_res=30"],
         lambda p: ["--config.data.crop_res=30", "patch size 8"]),
    Case("crop_res > real_res", lambda p: [_cfg(p), "--config.data.crop_res=40"],
         lambda p: ["--config.data.crop_res=40", "<= data.real_res = 36"]),
    Case("ipc larger than a class", lambda p: [_cfg(p, "init=real"), "--config.syn.ipc=5"],
         lambda p: ["syn.ipc", "only 3 training images"]),
    Case("keep_best without track_every", lambda p: [_cfg(p), "--config.eval.keep_best=true"],
         lambda p: ["--config.eval.keep_best", "--config.eval.track_every > 0"]),
    Case("bad rrc_scale", lambda p: [_cfg(p), "--config.augment.rrc_scale=(0.5,2.0)"],
         lambda p: ["--config.augment.rrc_scale=(0.5, 2.0)", "0 < lo <= hi <= 1"]),
    Case("bad eval.mode", lambda p: [_cfg(p), "--config.eval.mode=fast"], lambda p: ["--config.eval.mode='fast'"]),
    Case("bad backbone.dtype", lambda p: [_cfg(p), "--config.backbone.dtype=float16"],
         lambda p: ["--config.backbone.dtype='float16'", "'bfloat16'"]),
    Case("track_holdout=1", lambda p: [_cfg(p), "--config.eval.track_every=2", "--config.eval.track_holdout=1"],
         lambda p: ["--config.eval.track_holdout=1", "[0, 1)"]),
    Case("track_holdout without track_every", lambda p: [_cfg(p), "--config.eval.track_holdout=0.2"],
         lambda p: ["--config.eval.track_holdout=0.2", "--config.eval.track_every > 0"]),
    Case("track_holdout with real images encoded", lambda p: [_cfg(p, "source=backbone"), "--config.eval.track_every=2",
                                                            "--config.eval.track_holdout=0.2"],
         lambda p: ["--config.eval.track_holdout=0.2", "--config.real.source=cache"]),
    Case("bad real.source", lambda p: [_cfg(p), "--config.real.source=disk"],
         lambda p: ["--config.real.source='disk'"]),
    Case("bad syn.param", lambda p: [_cfg(p), "--config.syn.param=fourier"],
         lambda p: ["--config.syn.param='fourier'"]),
    Case("unknown augmentation", lambda p: [_cfg(p), "--config.augment.ops=flip,blur"],
         lambda p: ["--config.augment.ops='flip,blur'", "unknown: blur"]),
    Case("unknown baseline", lambda p: [_cfg(p), "--config.eval.baseline_sets=random,nearest"],
         lambda p: ["--config.eval.baseline_sets='random,nearest'", "unknown: nearest"]),
    Case("neighbour baseline without a set", lambda p: [_cfg(p), "--mode=baselines",
                                                        "--config.eval.baseline_sets=random,neighbour"],
         lambda p: ["--config.eval.baseline_sets='random,neighbour'", "use --mode=eval"]),
    Case("accum_chunks not dividing copies", lambda p: [_cfg(p), "--config.augment.accum_chunks=3"],
         lambda p: ["--config.augment.accum_chunks=3", "divisor of augment.copies = 2"]),
    Case("clp temperature=1e-30", lambda p: [_cfg(p), "--config.method.temperature=1e-30"],
         lambda p: ["--config.method.temperature=1e-30"]),
    Case("resume_allow names no key", lambda p: [_cfg(p), "--config.resume_allow=syn.lrr"],
         lambda p: ["--config.resume_allow='syn.lrr'", "no such key: syn.lrr"]),
    Case("class folder missing in val", lambda p: [_cfg(p)],
         lambda p: ["the train and val splits have different classes: missing in val",
                    "['class3']", "--config.data.classes=class0,class1,class2"], data="no_val_class"),
    Case("class folder missing in train", lambda p: [_cfg(p)],
         lambda p: ["missing in train", "['class3']", "--config.data.classes=class0,class1,class2"],
         data="no_train_class"),
    Case("class with no readable image", lambda p: [_cfg(p)],
         lambda p: ["every image of class 'class2'", "is unreadable", "--config.data.classes"],
         data="unreadable_class"),
    Case("second run on a locked workdir", lambda p: [_cfg(p)], lambda p: [f"--workdir {p['locked']} is in use",
                                                                          f"pid {p['holder_pid']}"],
         workdir="locked", needs="lock"),
]


def _snapshot(path: pathlib.Path):
    """What 'untouched' compares: None when absent, else every entry with its size and mtime."""
    if not os.path.lexists(path):
        return None
    if path.is_file():
        st = path.stat()
        return ("file", st.st_size, st.st_mtime_ns, path.read_bytes())
    return sorted((str(p.relative_to(path)), p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in path.rglob("*"))


def _tiny_hf(directory: pathlib.Path, config_text: str | None = None, truncate: bool = False):
    from safetensors.numpy import save_file
    directory.mkdir(parents=True)
    config = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "mlp_ratio": 2, "patch_size": 8, "image_size": 32}
    (directory / "config.json").write_text(config_text if config_text is not None else json.dumps(config))
    save_file({"w": np.zeros((128, 128), np.float32)}, str(directory / "model.safetensors"))
    if truncate:
        data = (directory / "model.safetensors").read_bytes()
        (directory / "model.safetensors").write_bytes(data[: len(data) // 3])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    paths = {"data": make_imagefolder(root / "images", counts={"train": 3, "val": 2}, seed=0)}
    paths["images"] = paths["data"]
    for name, split in (("no_val_class", "val"), ("no_train_class", "train")):
        paths[name] = make_imagefolder(root / name, counts={"train": 3, "val": 2}, seed=0)
        shutil.rmtree(pathlib.Path(paths[name]) / split / "class3")
    paths["unreadable_class"] = make_imagefolder(root / "unreadable", counts={"train": 3, "val": 2}, seed=0)
    for f in (pathlib.Path(paths["unreadable_class"]) / "train" / "class2").iterdir():
        f.write_bytes(b"not an image")
    paths["missing"] = str(root / "nowhere")
    paths["typo"] = str(root / "imagez")
    (root / "only_val" / "val" / "a").mkdir(parents=True)
    paths["no_train"] = str(root / "only_val")
    (root / "afile").write_text("not a directory")
    paths["file"], paths["under_file"] = str(root / "afile"), str(root / "afile" / "run")
    _tiny_hf(root / "bb_trunc", truncate=True)
    _tiny_hf(root / "bb_json", config_text='{"model_type": "dinov2", "hidden_size": 32,')
    paths["bb_trunc"], paths["bb_json"] = str(root / "bb_trunc"), str(root / "bb_json")
    paths["locked"] = str(root / "locked_run")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, paths["locked"]], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    assert holder.stdout.readline().strip() == "locked"
    paths["holder_pid"] = holder.pid
    ro = root / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() != 0:
        ro.chmod(0o555)
        ro_ok = True
    else:  # root ignores permissions: a read-only tmpfs is what is not writable for root
        mounted = ro_ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                                         capture_output=True).returncode == 0
    paths["ro"], paths["ro_run"] = str(ro), str(ro / "run")

    env = dict(os.environ, JAX_PLATFORMS="cpu", JDD_JAX_CACHE=str(root / "jax_cache"))
    env.pop("JDD_DEBUG", None)

    def run(case: Case):
        if case.needs == "ro" and not ro_ok:
            return case.name, "skip: running as root and cannot mount a read-only tmpfs"
        p = {**paths, "data": paths[case.data]}
        work = pathlib.Path(paths[case.workdir] if case.workdir else root / "work" / case.name.replace("/", "_"))
        before = _snapshot(work)
        cmd = [sys.executable, "-m", "jdd.main", *case.args(p), f"--workdir={work}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=TIMEOUT_S)
        return case.name, {"proc": proc, "before": before, "after": _snapshot(work), "expect": case.expect(p),
                           "cmd": cmd}

    full = root / "full"  # a 48 KiB file system: the first checkpoint does not fit
    full.mkdir()
    full_ok = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(full)], capture_output=True).returncode == 0

    def disk_full():
        if not full_ok:
            return "disk full", "skip: needs root to mount a small tmpfs"
        cmd = [sys.executable, "-m", "jdd.main", _cfg(paths), f"--config.real.cache_dir={root / 'cache'}",
               f"--workdir={full / 'run'}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=TIMEOUT_S)
        return "disk full", {"proc": proc, "cmd": cmd, "workdir": str(full / "run")}

    try:
        with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
            slow = pool.submit(disk_full)  # first: it compiles a step, the others only fail early
            out = dict(pool.map(run, CASES))
            out.update([slow.result()])
    finally:
        if full_ok:
            subprocess.run(["umount", str(full)], check=False)
        holder.kill()
        holder.wait()
        if mounted:
            subprocess.run(["umount", str(ro)], check=False)
        elif os.geteuid() != 0:
            ro.chmod(0o755)
    return out


def test_matrix_is_large_enough():
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.slow  # a CLI subprocess per case
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(results, case):
    r = results[case.name]
    if isinstance(r, str):
        pytest.skip(r[len("skip: "):])
    proc = r["proc"]
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    context = f"{' '.join(r['cmd'])}\nexit {proc.returncode}\nstderr tail:\n{proc.stderr[-2000:]}"
    assert proc.returncode == 2, context
    assert last.startswith("jdd: error: "), context
    for fragment in r["expect"]:
        assert fragment in last, f"{fragment!r} not in the last line\n{context}"
    assert "Traceback" not in proc.stderr, context
    assert r["after"] == r["before"], f"the workdir changed\n{context}"


@pytest.mark.slow  # a CLI subprocess per case
def test_disk_full_is_one_sentence_naming_the_path(results):
    """A full disk mid-run (orbax's async checkpoint writer hits ENOSPC): one line naming the file."""
    r = results["disk full"]
    if isinstance(r, str):
        pytest.skip(r[len("skip: "):])
    proc = r["proc"]
    last = proc.stderr.strip().splitlines()[-1]
    context = f"{' '.join(r['cmd'])}\nexit {proc.returncode}\nstderr tail:\n{proc.stderr[-2000:]}"
    assert proc.returncode == 2, context
    assert last.startswith(f"jdd: error: no space left on device while writing {r['workdir']}"), context
    assert "Traceback" not in proc.stderr, context


@pytest.mark.slow  # a CLI subprocess per case
def test_report_table(results, capsys):
    """Prints the matrix (input, exit status, message) for the issue's closing note (pytest -s shows it)."""
    rows = []
    for case in [*CASES, Case("disk full", None, None)]:
        r = results[case.name]
        if isinstance(r, str):
            rows.append(f"| {case.name} | skipped | {r} |")
            continue
        last = r["proc"].stderr.strip().splitlines()[-1] if r["proc"].stderr.strip() else ""
        rows.append(f"| {case.name} | {r['proc'].returncode} | {last.replace('|', '/')} |")
    with capsys.disabled():
        print("\n| input | exit | message |\n|---|---|---|\n" + "\n".join(rows))
    assert len(rows) == len(CASES) + 1
