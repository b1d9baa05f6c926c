"""Run this node pack inside a real, headless ComfyUI and push example workflow (a) through it.

    COMFYUI_DIR=/path/to/ComfyUI python tools/comfyui_headless_check.py [--python /path/to/venv/bin/python]

Steps: link the pack into `$COMFYUI_DIR/custom_nodes/` (a symlink, removed afterwards unless it was
already there), start `python main.py --cpu --listen 127.0.0.1 --port <free>` with a temporary output
folder, wait for the server, check `GET /object_info` lists every D3DS2 node, convert
`example_workflows/direct3d_s2_image_to_mesh.json` to the API format with the `tiny-random` model (and
2 steps per stage, no refiners: the tiny refiners are slow on a CPU and produce an empty field), POST it
to `/prompt`, poll `/history/<id>` and check the saved mesh is a GLB with our provenance. Exit status 0
on success; every failure prints one line saying what went wrong. The ComfyUI interpreter (`--python`,
default `$COMFYUI_PYTHON` or this one) needs ComfyUI's requirements and comfyui-frontend-package.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK_NAME = "ComfyUI-Direct3D-S2"


def _graphs():
    spec = importlib.util.spec_from_file_location("d3ds2_workflow_graphs", REPO / "tests" / "workflow_graphs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"FAIL: /prompt refused the workflow: {e.read().decode()[:2000]}") from None


def _glb_extras(path: Path) -> dict:
    data = path.read_bytes()
    if data[:4] != b"glTF":
        raise SystemExit(f"FAIL: {path} is not a GLB file.")
    n = struct.unpack("<I", data[12:16])[0]
    return json.loads(data[20:20 + n]).get("asset", {}).get("extras", {})


def run(comfy_dir: Path, python: str, timeout: float) -> int:
    if not (comfy_dir / "main.py").is_file():
        raise SystemExit(f"FAIL: {comfy_dir} is not a ComfyUI checkout (no main.py).")
    link = comfy_dir / "custom_nodes" / LINK_NAME
    made_link = False
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
        made_link = True
    out_dir = Path(tempfile.mkdtemp(prefix="d3ds2-comfy-out-"))
    port = _free_port()
    log_path = out_dir / "comfyui.log"
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--output-directory",
           str(out_dir), "--disable-auto-launch", "--dont-print-server"]
    print("$", " ".join(cmd), f"(cwd {comfy_dir})")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"FAIL: ComfyUI exited with {proc.returncode}; log:\n{log_path.read_text()[-3000:]}")
            try:
                info = _get(f"{base}/object_info", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() - t0 > timeout:
                    raise SystemExit("FAIL: ComfyUI did not answer within the timeout.") from None
                time.sleep(1)
        print(f"server up after {time.monotonic() - t0:.1f}s")
        log_text = log_path.read_text()
        if "IMPORT FAILED" in log_text and LINK_NAME in log_text:
            raise SystemExit(f"FAIL: the pack failed to import:\n{log_text[-3000:]}")
        graphs = _graphs()
        ours = graphs.our_nodes()
        missing = sorted(set(ours) - set(info))
        if missing:
            raise SystemExit(f"FAIL: /object_info lacks {missing}")
        print(f"/object_info lists all {len(ours)} D3DS2 nodes:", ", ".join(sorted(ours)))
        for node_id, d in ours.items():  # the server's view of each node agrees with our schema
            served = info[node_id]
            declared = {i.name for i in d.inputs}
            got = set(served["input"].get("required", {})) | set(served["input"].get("optional", {}))
            if declared != got:
                raise SystemExit(f"FAIL: {node_id} inputs served as {sorted(got)}, declared {sorted(declared)}")
        wf = json.loads((REPO / "example_workflows" / "direct3d_s2_image_to_mesh.json").read_text())
        from PIL import Image, ImageDraw

        img = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
        ImageDraw.Draw(img).ellipse((20, 12, 76, 84), fill=(190, 70, 40, 255))
        img.save(comfy_dir / "input" / "d3ds2_headless.png")
        for n in wf["nodes"]:
            if n["type"] == "LoadImage":
                n["widgets_values"][0] = "d3ds2_headless.png"
        overrides = {"D3DS2LoadModel": {"variant": "tiny-random", "allow_download": False},
                     "D3DS2SampleDense": {"steps": 2}, "D3DS2SampleSparse": {"steps": 2},
                     "D3DS2DecodeSparse": {"refine": False},
                     "D3DS2SaveMesh": {"filename_prefix": "headless/d3ds2"}}
        prompt = graphs.to_api_prompt(wf, ours, overrides)
        r = _post(f"{base}/prompt", {"prompt": prompt, "client_id": "d3ds2-headless-check",
                                     "extra_data": {"extra_pnginfo": {"workflow": wf}}})
        pid = r["prompt_id"]
        print(f"queued workflow (a) as prompt {pid} with tiny-random")
        t0 = time.monotonic()
        while True:
            hist = _get(f"{base}/history/{pid}")
            if pid in hist:
                entry = hist[pid]
                status = entry.get("status", {})
                if status.get("status_str") == "error" or not status.get("completed", True):
                    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise SystemExit(f"FAIL: execution error: {json.dumps(msgs)[:3000]}")
                break
            if proc.poll() is not None:
                raise SystemExit(f"FAIL: ComfyUI died while running; log:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() - t0 > timeout:
                raise SystemExit("FAIL: the workflow did not finish within the timeout.")
            time.sleep(1)
        print(f"workflow finished after {time.monotonic() - t0:.1f}s")
        saved = [x for out in entry["outputs"].values() for x in out.get("3d", [])]
        if not saved:
            raise SystemExit(f"FAIL: no 3d output in history: {json.dumps(entry['outputs'])[:1000]}")
        path = out_dir / saved[0]["subfolder"] / saved[0]["filename"]
        extras = _glb_extras(path)
        if (extras.get("variant") != "tiny-random" or extras.get("resolution") != 1024
                or "prompt" not in extras or "workflow" not in extras):
            raise SystemExit(f"FAIL: provenance missing in {path}: {extras}")
        import trimesh

        mesh = trimesh.load(path, force="mesh")
        print(f"saved {saved[0]['subfolder']}/{saved[0]['filename']}: {path.stat().st_size} bytes, "
              f"{len(mesh.vertices)} vertices, {len(mesh.faces)} faces, extras keys {sorted(extras)}")
        print("OK")
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if made_link:
            link.unlink()
        (comfy_dir / "input" / "d3ds2_headless.png").unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_DIR"), help="ComfyUI checkout")
    ap.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON", sys.executable),
                    help="interpreter with ComfyUI's requirements")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for startup and for the run")
    args = ap.parse_args()
    if args.comfyui is None:
        raise SystemExit("FAIL: set COMFYUI_DIR or pass --comfyui to a ComfyUI checkout.")
    return run(Path(args.comfyui).resolve(), args.python, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
