"""jdd.loop.build_step: the one builder of a run's compiled step that benchmarks and device checks use."""
import jax
import numpy as np
import pytest

from conftest import load_tiny_config
from jdd import context, loop, parallel, step as step_lib, synsets


def _built(method, source, **kw):
    c = load_tiny_config().get_config(f"method={method},source={source},param=pyramid,devices=1")
    bb = context.load_backbone(c.backbone.spec)
    return c, bb, loop.build_step(c, 4, context.embedder(bb, c.backbone.feature), bb.params,
                                  mesh=parallel.make_mesh(1), **kw)


@pytest.mark.slow  # the fast tier runs the loop through tests/test_engine.py
@pytest.mark.parametrize("method,source", [("clp", "cache"), ("lgm", "backbone"), ("sfm", "none")])
def test_built_step_runs_on_inputs_of_the_runs_shapes(method, source):
    c, bb, built = _built(method, source, full_pyramid=True, cache_rows=12)
    state, consts, _, real = built.args
    assert built.spec == step_lib.make_spec(c, 4, built.method)
    # Every pyramid level present, and the step counter there (the steady-state cost).
    assert len(state["params"]["syn"]["levels"]) == len(synsets.level_resolutions(c.syn.res))
    start = int(state["step"])
    assert start > 0
    if source == "cache":
        assert real["feats"].shape == (12, 1, bb.embed_dim) and int(np.sum(real["counts"])) == 12
    elif source == "backbone":
        assert real["image"].shape == (4 * built.spec.real_per_class, 32, 32, 3)
    new, metrics = built.fn(*built.args)
    assert np.isfinite(float(metrics["loss"])) and int(new["step"]) == start + 1


@pytest.mark.slow
def test_abstract_build_compiles_to_the_same_memory_as_the_concrete_one():
    _, _, concrete = _built("clp", "cache", donate=False)
    _, _, abstract = _built("clp", "cache", donate=False, abstract=True)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.args))
    assert abstract.memory_bytes() == concrete.memory_bytes() > 0
