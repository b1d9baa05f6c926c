"""Issue 15 item 4: an empty mesh is stopped where it appears, in one sentence naming the stage and what to
change. It used to flow on until core SaveGLB raised "zero-size array to reduction operation maximum which
has no identity" (or, in the chain, until Mesh To Structure said "Mesh 0 has no faces")."""

import pytest
import torch
from tiny_chain import latent, models  # noqa: F401 (fixtures)

from s2core import pipeline as P
from s2core import results

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

EMPTY = (torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64))


def test_decode_without_surface_names_the_stage(models, latent, monkeypatch):
    monkeypatch.setattr(P, "meshes_from_sparse_sdf", lambda *a, **k: [EMPTY])
    with pytest.raises(
        ValueError,
        match=r"^The mesh is empty because the 512 stage's field has no surface at level "
        r"0\.3; try another seed or threshold\.$",
    ):
        P.decode_sparse(models, latent, refine=False, threshold=0.3)


def test_refined_decode_without_surface_suggests_turning_refine_off(models, latent, monkeypatch):
    import s2core.refiner as rf

    # the refiner's 27 cubes are run by tests/test_pipeline.py::test_refiner_path_512; here only what follows them
    monkeypatch.setattr(rf, "remove_interior", lambda *a, **k: None)
    monkeypatch.setattr(rf, "mesh_refined_field", lambda *a, **k: [EMPTY])
    with pytest.raises(ValueError, match=r"512 stage's refined field has no surface at level 0\.4; turn refine off"):
        P.decode_sparse(models, latent, refine=True, threshold=0.2)


def test_postprocess_of_an_empty_mesh_is_refused():
    with pytest.raises(ValueError, match="given to post-processing has no faces; connect a mesh with triangles"):
        P.postprocess(results.Mesh.from_list([EMPTY]))


def test_saving_an_empty_mesh_writes_nothing(tmp_path):
    out = tmp_path / "empty.glb"
    with pytest.raises(ValueError, match="nothing to save"):
        P.save(results.Mesh.from_list([EMPTY]), out)
    assert not any(tmp_path.iterdir())


def test_batch_names_the_empty_item(tmp_path):
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    f = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match=r"^Mesh 1 is empty"):
        P.save(results.Mesh.from_list([(v, f), EMPTY]), tmp_path / "b.glb")
