"""Shared pieces of the tests that run the tiny-random chain (reliability tests import them).

Fixtures defined here become fixtures of each module that imports them.
"""

import hashlib

import pytest
import torch

from s2core import loading, results
from s2core import pipeline as P

STEPS = dict(dense_steps=2, sparse_512_steps=2, resolution=512, refine_512=False)


@pytest.fixture(scope="module")
def models():
    return loading.load_models("tiny-random", ("dense", "sparse_512"))


@pytest.fixture(scope="module")
def latent(models):
    """The 512 sparse latent of `picture()` (seed 1, one step per stage): the input of the decode tests."""
    img, mask = picture()
    cond = P.encode_image(models, img, mask)
    st = P.decode_dense(models, P.sample_dense(models, cond, seed=1, steps=1))
    return P.sample_sparse(models, cond, st, seed=1, steps=1)


def picture(shift=0):
    """A red block on white with its object mask (1 = object), IMAGE [1, 64, 64, 3] and MASK [1, 64, 64]."""
    img = torch.ones(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    img[:, 12 + shift : 52, 16:48] = torch.tensor([0.7, 0.3, 0.2])
    mask[:, 12 + shift : 52, 16:48] = 1
    return img, mask


def mesh_hash(mesh: results.Mesh) -> str:
    h = hashlib.sha256()
    for v, f in mesh.items():
        h.update(v.contiguous().cpu().numpy().tobytes())
        h.update(f.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
