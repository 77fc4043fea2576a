"""Beyond one host: ``jax.distributed`` with 2 CPU processes (loopback, gloo collectives).

Each process gets 2 forced host devices, so the global mesh has 4 devices, like the 1-process,
4-device reference run in this test process (conftest forces 4 host devices). Same global batch,
same config: the distilled images, the metric log and the final checkpoint must agree.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import load_tiny_config, make_imagefolder
from jdd import distill, parallel

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.py")
PROCESSES, DEVICES_PER_PROCESS = 2, 2
TIMEOUT_S = 240  # per group of processes; a hang (a mismatched collective) fails instead of blocking CI
LAUNCH = REPO / "launch"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """4 classes x 4 train / 2 val images of coloured noise (ImageFolder)."""
    return make_imagefolder(tmp_path_factory.mktemp("mh_imagefolder"), counts={"train": 4, "val": 2}, seed=1,
                            size=(40, 40))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    """This interpreter first on PATH and this checkout first on PYTHONPATH, plus ``extra``."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PATH=path, PYTHONPATH=pythonpath, JAX_PLATFORMS="cpu", **extra)


def _wait_all(procs, timeout: float) -> None:
    """Waits for every process (group); kills the groups still running after ``timeout``."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def explicit_env(i: int, processes: int, port: int) -> dict:
    """The explicit form: JDD_COORDINATOR / JDD_NUM_PROCESSES / JDD_PROCESS_ID."""
    return dict(JDD_COORDINATOR=f"127.0.0.1:{port}", JDD_NUM_PROCESSES=str(processes), JDD_PROCESS_ID=str(i))


def slurm_env(i: int, processes: int, port: int) -> dict:
    """What ``srun`` sets for task i of a one-node step; JAX's own SLURM detection takes it from there."""
    return dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(processes),
                SLURM_STEP_NUM_TASKS=str(processes), SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                JAX_COORDINATOR_PORT=str(port))


def run_processes(args: list[str], cwd, *, processes: int = PROCESSES, timeout: float = TIMEOUT_S,
                  launcher=explicit_env) -> list[str]:
    """Runs ``python ARGS`` as one jax.distributed job of ``processes`` local processes; their logs.

    The processes find each other on this machine (127.0.0.1 / localhost) through the variables
    ``launcher(i, processes, port)`` sets. On a timeout every process is killed, so a deadlock
    fails the test instead of hanging it.
    """
    port = _free_port()
    procs, logs = [], []
    for i in range(processes):
        env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
                   **launcher(i, processes, port))
        log = open(pathlib.Path(cwd) / f"process{i}.log", "w+")
        procs.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)
    _wait_all(procs, timeout)
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    for i, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{text[-4000:]}"
    return texts


def run_single_host_script(config: str, workdir, *flags, timeout: float = TIMEOUT_S) -> str:
    """``JDD_PROCS=2 launch/single_host.sh CONFIG WORKDIR FLAGS``: 2 local processes x 2 CPU devices."""
    env = _env(JDD_PROCS=str(PROCESSES), JDD_DEVICES_PER_PROC=str(DEVICES_PER_PROCESS), JDD_PORT=str(_free_port()))
    proc = subprocess.Popen(["bash", str(LAUNCH / "single_host.sh"), config, str(workdir), *flags],
                            cwd=workdir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    others = "".join(p.read_text()[-2000:] for p in sorted(pathlib.Path(workdir).glob("process*.log")))
    assert proc.returncode == 0, f"single_host.sh exited with {proc.returncode}:\n{out[-3000:]}\n{others}"
    return out


def _load_tiny():
    return load_tiny_config()


def _checkpoint_metadata(path):
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
    return getattr(meta, "item_metadata", meta)


def _split_leaves(workdir, step: int) -> int:
    """How many leaves of the saved state were split over the ``data`` axis (from orbax's metadata)."""
    import jax
    meta = _checkpoint_metadata(pathlib.Path(workdir, "checkpoints", str(step), "state").resolve())
    specs = [tuple(getattr(m.sharding, "partition_spec", ()) or ()) for m in jax.tree.leaves(meta)]
    return sum(parallel.AXIS in spec for spec in specs)


def _restore_state(workdir, step: int) -> dict:
    """The state saved at ``step`` as {path: host array}, read onto this process's first device.

    The saved tree's own metadata gives the target (a multi-host checkpoint records devices that
    this process does not have, so orbax needs a target on local devices).
    """
    import jax
    import orbax.checkpoint as ocp
    path = pathlib.Path(workdir, "checkpoints", str(step), "state").resolve()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), _checkpoint_metadata(path))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, target)
    return {k: np.asarray(v) for k, v in _flat(restored)}


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flat(v, f"{prefix}/{i}")
    elif tree is not None:
        yield prefix, tree


@pytest.mark.slow
def test_two_processes_equal_one_process(tiny_data, tmp_path):
    """LGM with real batches encoded in-step: each host reads its half of every real batch.

    The 2-process run stops after step 2 and resumes from its checkpoint (orbax saving and restoring
    across processes); the 1-process run goes through.
    """
    import jax
    assert len(jax.devices()) == PROCESSES * DEVICES_PER_PROCESS, \
        "conftest forces 4 host devices (XLA_FLAGS); the 1-process reference needs them"
    tiny = _load_tiny()
    arg = f"data={tiny_data},method=lgm,source=backbone,steps=3"
    # Split the per-image state over the devices (all of it, however small).
    overrides = ["--config.parallel.shard_state_mb=0"]

    multi = tmp_path / "multi"
    # Stopped after step 2's checkpoint, then resumed: orbax saves and restores across processes.
    run_single_host_script(f"{TINY}:{arg.replace('steps=3', 'steps=2')}", multi, *overrides)
    run_single_host_script(f"{TINY}:{arg}", multi, *overrides)

    cfg = tiny.get_config(arg + f",devices={PROCESSES * DEVICES_PER_PROCESS}")
    cfg.parallel.shard_state_mb = 0.0
    single = tmp_path / "single"
    distill.run(cfg, str(single))
    start = tmp_path / "start"
    distill.run(tiny.get_config(arg.replace("steps=3", "steps=0") + ",devices=1"), str(start))

    with np.load(multi / "distilled.npz") as f, np.load(single / "distilled.npz") as g:
        np.testing.assert_allclose(f["images"], g["images"], rtol=0, atol=2e-5)
        np.testing.assert_array_equal(f["labels"], g["labels"])
        with np.load(start / "distilled.npz") as s0:
            assert np.abs(f["images"] - s0["images"]).max() > 1e-3, "the images did not move"
    # Logs come from process 0 alone: one row per logging step, not one per process.
    rows = {w: [json.loads(line) for line in open(w / "metrics.jsonl")] for w in (multi, single)}
    assert [r["step"] for r in rows[multi]] == [r["step"] for r in rows[single]] == [2, 3]
    np.testing.assert_allclose([r["loss"] for r in rows[multi]], [r["loss"] for r in rows[single]], rtol=1e-4)
    # The checkpoint the two processes wrote together holds the same state as the 1-process one.
    a, b = _restore_state(multi, 3), _restore_state(single, 3)
    assert sorted(a) == sorted(b) and any("opt" in k for k in a)
    # The per-image leaves (pyramid levels and their Adam moments) were split over devices.
    assert _split_leaves(multi, 3) >= 3 and _split_leaves(single, 3) >= 3
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=2e-5, err_msg=k)


_HELPERS = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from jdd import parallel
    parallel.initialize()
    import jax
    out, p = {}, jax.process_index()
    mesh = parallel.make_mesh()
    out["mesh"] = [d.process_index for d in mesh.devices]
    out["mesh2"] = [d.process_index for d in parallel.make_mesh(2).devices]
    # Each host passes its rows; the global batch is their concatenation in process order.
    local = np.arange(4 * p, 4 * p + 4, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    batch = parallel.global_batch({"x": local}, mesh)["x"]
    out["batch"] = parallel.to_host(batch)[:, 0].tolist()
    out["sum"] = float(jax.jit(lambda x: x.sum())(batch))
    # A per-image leaf split over hosts comes back whole on every host; a small one stays replicated.
    tree = {"levels": [np.arange(8 * 3, dtype=np.float32).reshape(8, 3)], "count": np.int32(5)}
    sh = parallel.state_shardings(tree, mesh, rows=8, min_bytes=0)
    placed = parallel.place(tree, sh)
    out["split"] = [not placed["levels"][0].is_fully_addressable, placed["count"].is_fully_replicated]
    host = parallel.to_host(jax.jit(lambda t: jax.tree.map(lambda x: x * 2, t))(placed))
    out["levels"] = host["levels"][0].tolist()
    # Process 0 builds (slowly) what the others then only read.
    target = os.path.join(sys.argv[1], "built.txt")
    def build():
        if not os.path.exists(target):
            time.sleep(1.0)
            with open(target, "w") as f:
                f.write(str(p))
        return open(target).read()
    out["built_by"] = parallel.main_first(build, "test-build")
    parallel.barrier("test-end")
    json.dump(out, open(os.path.join(sys.argv[1], f"out{p}.json"), "w"))
""")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [explicit_env, slurm_env], ids=["explicit", "slurm"])
def test_parallel_helpers_across_processes(tmp_path, launcher):
    """Mesh order, per-host batches, host-split state, barriers: the pieces a multi-host run relies on.

    "slurm": no JDD_* variables; parallel.initialize() leaves the cluster detection to JAX.
    """
    run_processes(["-c", _HELPERS, str(tmp_path)], tmp_path, timeout=120, launcher=launcher)
    for p in range(PROCESSES):
        out = json.load(open(tmp_path / f"out{p}.json"))
        assert out["mesh"] == [0, 0, 1, 1]
        assert out["mesh2"] == [0, 1]
        assert out["batch"] == list(range(8)) and out["sum"] == 3 * sum(range(8))
        assert out["split"] == [True, True]
        np.testing.assert_array_equal(out["levels"], 2 * np.arange(24).reshape(8, 3))
        assert out["built_by"] == "0"


def test_launch_scripts_parse():
    scripts = sorted(LAUNCH.glob("*.sh"))
    assert {p.name for p in scripts} >= {"tpu_vm.sh", "slurm.sh", "single_host.sh"}
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"JDD_COORDINATOR": "10.0.0.1:1234"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, False),  # inside sbatch, before srun: one process
    ({"SLURM_STEP_NUM_TASKS": "8"}, True),
    ({"SLURM_STEP_NUM_TASKS": "1"}, False),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "a,b", "JDD_MULTIHOST": "0"}, False),
    ({"JDD_MULTIHOST": "1"}, True),
])
def test_multihost_from_env(env, expected):
    assert parallel.multihost_from_env(env) is expected


def test_incomplete_coordinator_settings_are_refused(monkeypatch):
    import jax
    if jax.distributed.is_initialized():
        pytest.skip("this process is already part of a distributed job")
    monkeypatch.setenv("JDD_COORDINATOR", "127.0.0.1:1")
    monkeypatch.delenv("JDD_NUM_PROCESSES", raising=False)
    monkeypatch.setenv("JDD_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="JDD_NUM_PROCESSES"):
        parallel.initialize()
    monkeypatch.setenv("JDD_NUM_PROCESSES", "2")
    monkeypatch.setenv("JDD_LOCAL_DEVICE_IDS", "0,x")
    with pytest.raises(ValueError, match="JDD_LOCAL_DEVICE_IDS"):
        parallel.initialize()


# ------------------------------------------------------------------------------------------------
# Per-device memory (launch/memory.py, docs/scaling.md): the activation term of the model
# is a count of what JAX's backprop keeps per image through the frozen ViT.
# ------------------------------------------------------------------------------------------------
def _memory_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("jdd_memory", LAUNCH / "memory.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("width,depth,heads,mlp,patch,res", [(64, 2, 2, 256, 8, 64), (96, 3, 3, 384, 16, 96)])
def test_activation_model_counts_jax_residuals(monkeypatch, width, depth, heads, mlp, patch, res):
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jdd import backbones
    from jdd.backbones import convert, vit
    memory = _memory_module()
    monkeypatch.setattr(vit, "attention", vit.dense_attention)  # the GPU/TPU attention (CPU chunks and remats)
    cfg = dataclasses.replace(backbones.family_named("dinov2").config("test", res), width=width, depth=depth,
                              heads=heads, mlp_dim=mlp, patch_size=patch)
    params = convert.unflatten({k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in backbones.param_shapes(cfg).items()})
    module = vit.ViT(cfg)
    bb = backbones.Backbone(module=module, params=params, family="dinov2", name="t", patch_size=patch,
                            image_size=res, embed_dim=cfg.embed_dim)

    def residuals(batch):  # floats held by the VJP closure (shapes only: nothing is computed)
        def vjp_of(p, x):
            return jax.vjp(lambda y: jnp.sum(bb.apply(p, y)["embedding"] ** 2), x)[1]
        tree = jax.eval_shape(vjp_of, params, jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32))
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))

    per_image = residuals(2) - residuals(1)  # parameters and constants cancel
    model = memory.activation_floats(memory.Arch(width=width, depth=depth, heads=heads, mlp_dim=mlp, patch=patch), res)
    assert abs(per_image / model - 1) < 0.05, (per_image, model)


def test_chunks_for_budget_is_the_smallest_that_fits():
    memory = _memory_module()
    arch = memory.ARCHS["B/14"]
    for method, ipc, copies, n, budget in [("lgm", 10, 10, 64, 16), ("clp", 1, 10, 8, 80), ("lgm", 1, 10, 8, 16)]:
        kw = dict(method=method, num_classes=1000, ipc=ipc, copies=copies, devices=n, shard_state=True,
                  cache_rows=1_281_167 if method == "clp" else 0)
        k = memory.chunks_for_budget(budget * memory.GiB, arch, **kw)
        total = lambda k: memory.step_bytes(arch, chunks=k, real_chunks=k, **kw)["total"]  # noqa: E731
        assert k is not None and total(k) <= budget * memory.GiB
        assert k == 1 or total(k - 1) > budget * memory.GiB
    # The state alone exceeds a 16 GiB device when replicated at 10 images per class on 8 devices:
    # no number of chunks helps.
    assert memory.chunks_for_budget(16 * memory.GiB, arch, method="lgm", num_classes=1000, ipc=10, copies=10,
                                    devices=8, shard_state=False) is None


def test_state_shardings_split_only_large_per_image_leaves():
    import jax
    assert len(jax.devices()) >= 4, "conftest forces 4 host devices (XLA_FLAGS); the setting was lost"
    mesh = parallel.make_mesh(4)
    tree = {"levels": [np.zeros((8, 1, 1, 3), np.float32), np.arange(8 * 16 * 16 * 3, dtype=np.float32).reshape(8, 16, 16, 3)],
            "labels": np.zeros((8, 5), np.float32), "w": np.zeros((5, 8), np.float32), "step": np.int32(0),
            "other": np.zeros((6, 16, 16, 3), np.float32)}
    spec = lambda t: jax.tree.map(lambda s: tuple(s.spec), parallel.state_shardings(t, mesh, rows=8, min_bytes=1024))  # noqa: E731
    assert spec(tree) == {"levels": [(), ("data",)], "labels": (), "w": (), "step": (), "other": ()}
    placed = parallel.place(tree, parallel.state_shardings(tree, mesh, rows=8, min_bytes=1024))
    assert placed["levels"][1].addressable_shards[0].data.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(parallel.to_host(placed)["levels"][1], tree["levels"][1])
    # 6 images on 4 devices: a pyramid level is split along its rows instead; 6 x 5 labels stay whole.
    odd = {"level": np.zeros((6, 16, 16, 3), np.float32), "labels": np.zeros((6, 5), np.float32)}
    assert jax.tree.map(lambda s: tuple(s.spec), parallel.state_shardings(odd, mesh, rows=6, min_bytes=0)) == \
        {"level": (None, "data"), "labels": ()}
