"""Test-only stand-ins for the probe tests: a tiny frozen "backbone" and augmentation, cheap to compile.

7 images of 16 px, 3 classes, 6-dim features: with batch 3 a probe epoch has steps of 3, 3 and 1 (a
partial last batch)."""
import jax
import jax.numpy as jnp
import numpy as np

N, C, D, RES = 7, 3, 6, 16
PROJ = np.random.default_rng(0).normal(size=(RES * RES * 3, D)) / 8.0


def embed_np(x):
    """The stand-in backbone in float64 (the reference)."""
    return np.tanh(x.reshape(x.shape[0], -1) @ PROJ)


def embed_jax(x):
    """The stand-in backbone in float32, jittable."""
    return jnp.tanh(x.reshape(x.shape[0], -1) @ jnp.asarray(PROJ, jnp.float32))


def flip_shift(key, image):
    """The stand-in augmentation: random flip and random cyclic shift of one image."""
    kf, ks = jax.random.split(key)
    image = jnp.where(jax.random.bernoulli(kf), image[:, ::-1], image)
    return jnp.roll(image, jax.random.randint(ks, (2,), 0, RES), axis=(0, 1))
