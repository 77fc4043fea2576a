"""launch/studies/tune_clp.py's calibration: the temperature at which the class-centroid start is calibrated."""
import importlib.util
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from jdd import selection
from jdd.methods import clp, linear

spec = importlib.util.spec_from_file_location(
    "tune_clp", pathlib.Path(__file__).parents[1] / "launch" / "studies" / "tune_clp.py")
tune_clp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tune_clp)


def _classes(separation: float, seed: int = 0, num_classes: int = 4, per_class: int = 40, dim: int = 8):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim)) * separation
    labels = np.repeat(np.arange(num_classes), per_class)
    return (means[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def _ce64(feats, labels, cfg, temperature):
    """The outer CE of the centroid probe at ``temperature``, in float64 numpy from the probe's logits."""
    c = int(labels.max()) + 1
    idx = selection.centroid_indices(feats, labels, c, 1)
    fit = linear.ridge_probe(feats[idx], linear.regression_targets(jax.nn.one_hot(np.arange(c), c), True),
                             cfg.ridge, fit_bias=True)
    z = np.asarray(linear.logits(fit, feats), np.float64) * (1.0 + cfg.ridge) / temperature
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]))


@pytest.mark.parametrize("ridge", [1.0, 3.0])
def test_calibrated_temperature_is_the_minimum_of_the_centroid_probes_ce(ridge):
    feats, labels = _classes(separation=1.0)
    cfg = ml_collections.ConfigDict(dict(clp.default_config(), ridge=ridge))
    t = tune_clp.calibrated_temperature(feats, labels, 4, cfg)
    assert 1e-3 < t < 1e2
    at = _ce64(feats, labels, cfg, t)
    for step in (1.05, 1.5, 3.0):  # the grid's spacing is 1.012: a 5 % step either way costs CE
        assert at < _ce64(feats, labels, cfg, t * step) and at < _ce64(feats, labels, cfg, t / step)


def test_better_separated_classes_are_calibrated_at_a_lower_temperature():
    cfg = ml_collections.ConfigDict(clp.default_config())
    temps = [tune_clp.calibrated_temperature(*_classes(separation=s), 4, cfg) for s in (0.5, 1.0, 2.0)]
    assert temps[0] > temps[1] > temps[2], temps
