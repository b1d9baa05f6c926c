"""Issue 11 item 2 (bad checkpoints and files): a release file of the other variant is named as such, and
an interrupted weights download never leaves a complete-looking file, and the next call
gets the whole file. The network is faked one level below huggingface_hub (its httpx client gets a
MockTransport that plays the Hub: HEAD gives commit, ETag and size; GET streams the bytes, honours Range,
and can drop the connection part way), so the real `hf_hub_download` → temp `.incomplete` file → size
check → rename path runs unchanged through `find_weights.resolve_weights`."""

import hashlib

import pytest

# huggingface_hub >= 1.0 talks HTTP through httpx (vendored as httpx2 in 2.x); older ones used requests
httpx2 = pytest.importorskip("httpx2", reason="the fake Hub plugs into huggingface_hub's httpx2 client")
from huggingface_hub import close_session, file_download, set_client_factory  # noqa: E402
from huggingface_hub.utils import _http  # noqa: E402

from s2core import checkpoints as ck  # noqa: E402
from s2core import find_weights  # noqa: E402
from s2core.release import FILE_PARTS, manifest_key  # noqa: E402

BODY = bytes(range(256)) * 4096  # 1 MiB stands in for model_dense.ckpt
SHA = hashlib.sha256(BODY).hexdigest()
COMMIT = "a" * 40


class FakeHub:
    """`cut_at`: the connection drops when the file position reaches it, for the first `cut_gets` GETs
    (None: whole body); `short`: the server closes the stream cleanly at that position (a truncated
    response that still looks finished)."""

    def __init__(self):
        self.cut_at, self.cut_gets, self.short, self.gets, self.ranges = None, 1, None, 0, []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        head = {
            "X-Repo-Commit": COMMIT,
            "X-Linked-Etag": f'"{SHA}"',
            "X-Linked-Size": str(len(BODY)),
            "ETag": f'"{SHA}"',
        }
        if not request.url.path.endswith("/model_dense.ckpt"):
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"}, request=request)
        if request.method == "HEAD":
            return httpx2.Response(200, headers={**head, "Content-Length": str(len(BODY))}, request=request)
        self.gets += 1
        start = 0
        rng = request.headers.get("Range")
        self.ranges.append(rng)
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
        body, hub = BODY[start:], self
        cut_at = self.cut_at if self.gets <= self.cut_gets else None

        class Stream(httpx2.SyncByteStream):
            def __iter__(self):
                sent = start
                for i in range(0, len(body), 64 * 1024):
                    chunk = body[i : i + 64 * 1024]
                    if hub.short is not None and sent + len(chunk) > hub.short:
                        yield chunk[: hub.short - sent]
                        return
                    if cut_at is not None and sent + len(chunk) > cut_at:
                        yield chunk[: cut_at - sent]
                        raise httpx2.RemoteProtocolError("peer closed connection without sending complete message body")
                    sent += len(chunk)
                    yield chunk

        headers = {**head, "Content-Length": str(len(body))}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"
        return httpx2.Response(206 if start else 200, headers=headers, stream=Stream(), request=request)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(file_download.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(file_download.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(file_download.time, "sleep", lambda s: None)  # its retry back-off
    monkeypatch.setattr(file_download.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)  # write as the bytes come
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake), follow_redirects=True))
    close_session()
    yield fake
    set_client_factory(_http.default_client_factory)
    close_session()


def _resolve(models):
    return find_weights.resolve_weights("v1.1", stages=("dense",), models_dir=models, with_dinov2=False)


def _files(folder):
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts
    )


def test_download_complete_is_the_whole_file(hub, tmp_path):
    models = tmp_path / "models"
    got = _resolve(models)["model_dense"]
    assert got == models / "direct3d-s2-v-1-1" / "model_dense.ckpt" and got.read_bytes() == BODY
    assert _files(models) == ["direct3d-s2-v-1-1/model_dense.ckpt"]


def test_dropped_connection_resumes_within_the_call(hub, tmp_path):
    hub.cut_at = len(BODY) // 3  # the first GET dies a third of the way; the retry asks for the rest only
    models = tmp_path / "models"
    got = _resolve(models)["model_dense"]
    assert got.read_bytes() == BODY
    # the retry asks only for the bytes not yet on disk (what reached the temp file, in whole chunks)
    assert hub.gets == 2 and hub.ranges[0] is None
    start = int(hub.ranges[1].split("=")[1].rstrip("-"))
    assert 0 < start <= len(BODY) // 3


def test_interrupted_download_leaves_nothing_complete_looking_and_next_call_redownloads(hub, tmp_path):
    models = tmp_path / "models"
    hub.cut_at, hub.cut_gets = len(BODY) // 2, 10**6  # every GET dies at the same byte: no progress, it gives up
    with pytest.raises(FileNotFoundError, match="the download failed") as e:
        _resolve(models)
    assert "model_dense.ckpt" in str(e.value)
    assert not (models / "direct3d-s2-v-1-1" / "model_dense.ckpt").exists()
    assert not [f for f in _files(models) if f.endswith(".ckpt")]  # no complete-looking file
    assert not list(models.rglob("*.incomplete"))  # and no temp file left either

    assert hub.gets == 6  # the first GET, then huggingface_hub's 5 resumes, all from byte len/2
    assert set(hub.ranges[1:]) == {f"bytes={len(BODY) // 2}-"}
    # the network is back: the next call downloads the whole file
    hub.cut_at = None
    got = _resolve(models)["model_dense"]
    assert got.read_bytes() == BODY


def test_truncated_response_fails_the_size_check(hub, tmp_path):
    """A server that closes the stream early without an error: the size from the Hub's HEAD catches it."""
    models = tmp_path / "models"
    hub.short = len(BODY) - 1000
    with pytest.raises(FileNotFoundError, match="the download failed"):
        _resolve(models)
    assert not [f for f in _files(models) if f.endswith(".ckpt") or f.endswith(".incomplete")]
    hub.short = None
    assert _resolve(models)["model_dense"].stat().st_size == len(BODY)


def test_wrong_variant_for_the_selected_stage_is_named(tmp_path):
    """A v1.0 sparse file with v1.1 selected (and the reverse) says which release it is, not just "wrong shape"."""
    import torch

    from s2core.manifest import manifest

    for have, selected in (("v1.0", "v1.1"), ("v1.1", "v1.0")):
        one = torch.zeros(1, dtype=torch.float16)  # zero-stride views: full shapes for a few bytes on disk
        parts = {
            p: {
                s.name: one.expand(*s.shape) if s.shape else one.reshape(())
                for s in manifest(manifest_key("model_sparse_512", p, have))
            }
            for p in FILE_PARTS["model_sparse_512"]
        }
        path = tmp_path / have / "model_sparse_512.ckpt"
        path.parent.mkdir()
        torch.save(parts, path)
        assert ck.load_part(path, "dit", manifest_key("model_sparse_512", "dit", have))  # loads as what it is
        with pytest.raises(
            ValueError,
            match=rf"is the Direct3D-S2 {have} release of this file but {selected} is "
            rf"selected: this is the {have} release; choose {have}",
        ):
            ck.load_part(path, "dit", manifest_key("model_sparse_512", "dit", selected))
