"""Run every example workflow of this pack in a real, headless ComfyUI with the `tiny-random` model.

    python tools/comfyui_headless_check.py --comfyui /path/to/ComfyUI [--python /path/to/venv/bin/python]
        [--record tests/HEADLESS_CHECK.md] [--cores 2] [--threads 1] [--max-seconds 60]

What it does, leaving the ComfyUI checkout untouched: makes a temporary base directory whose
`custom_nodes/ComfyUI-Direct3D-S2` links to this repository and whose `input/example.png` is a small
test picture (the name the workflows' Load Image uses), starts `main.py --cpu --base-directory <tmp>`
on a free localhost port (pinned to `--cores` CPUs, with `--threads` PyTorch threads), checks
`GET /object_info` lists every D3DS2 node with the inputs we declare, then for each
`example_workflows/*.json`:

* converts it to the API format (`tests/workflow_graphs.py::to_api_prompt`) changing one thing only,
  the model choice (`D3DS2LoadModel.variant = tiny-random`);
* SKIPs it, saying why, when this ComfyUI lacks a core node it uses (the core 3D toolchain and Remove
  Background need ComfyUI 0.38.1+) or does not offer a file a core loader asks for (the text-to-image
  workflows need an SDXL checkpoint: pass `--extra-model-paths-config` to a ComfyUI
  extra_model_paths.yaml that has it);
* otherwise POSTs it to `/prompt`, polls `/history/<id>` and checks every saved mesh is a GLB (or
  other mesh file) with faces; PASS needs that and a wall time (POST to done) under `--max-seconds`.

Prints one line per workflow and exits 0 when nothing FAILed and something PASSed. `--record FILE`
writes the run (date, ComfyUI version, CPU, load average, per-workflow result/time/faces, the command) as
Markdown. On a machine whose cores other jobs also use, PyTorch's default of one thread per core makes
every small op wait for a thread that is not running (one 220k-element multiply: 11.5 ms with 2 threads,
0.15 ms with 1, on a 2-core machine at load 4); `--threads 1` measures the pack instead of that wait.
The ComfyUI interpreter needs ComfyUI's requirements (incl. comfyui-frontend-package) and torch.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK_NAME = "ComfyUI-Direct3D-S2"
MODEL_CHOICE = {"D3DS2LoadModel": {"variant": "tiny-random"}}


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
    with urllib.request.urlopen(req, timeout=60) as r:
        data = r.read()
    return json.loads(data) if data.strip() else {}  # /interrupt answers with an empty body


def combo_options(spec) -> list | None:
    """The allowed values of an /object_info input spec if it is a combo (old list form or V3 forms)."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(opts.get("options", []))
    if kind == "COMFY_DYNAMICCOMBO_V3":
        return [o.get("key") for o in opts.get("options", [])]
    return None


def skip_reason(prompt: dict, info: dict) -> str | None:
    """Why this ComfyUI cannot run the prompt (a missing core node or a missing file), or None."""
    missing = sorted({n["class_type"] for n in prompt.values()} - set(info))
    if missing:
        return f"this ComfyUI has no {', '.join(missing)} (core nodes of ComfyUI {_graphs().CORE_3D_VERSION}+)"
    for n in prompt.values():
        if n["class_type"].startswith("D3DS2"):  # ours: a missing option is a failure, not a reason to skip
            continue
        spec = info[n["class_type"]]["input"]
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        for name, value in n["inputs"].items():
            opts = combo_options(declared.get(name))
            if isinstance(value, str) and opts is not None and value not in opts:
                return (
                    f"{n['class_type']}.{name} = {value!r} is not available here (a model file to put in "
                    f"ComfyUI's models folders; tiny-random replaces only our model)"
                )
    return None


def saved_meshes(entry: dict, out_dir: Path) -> list[Path]:
    return [
        out_dir / x.get("subfolder", "") / x["filename"]
        for out in entry.get("outputs", {}).values()
        for x in out.get("3d", [])
        if x.get("type") == "output"
    ]


def mesh_faces(path: Path) -> int:
    import trimesh

    if path.suffix == ".glb" and path.read_bytes()[:4] != b"glTF":
        raise ValueError(f"{path.name} is not a GLB file")
    return int(len(trimesh.load(path, force="mesh", process=False).faces))


def import_failed(log_text: str) -> bool:
    """Whether ComfyUI's import-times list marks this pack `(IMPORT FAILED)`. Only the entry that names
    the pack's folder counts: core modules failing (e.g. "IMPORT FAILED: nodes_audio.py" without
    torchaudio) are not ours, and other lines may mention the folder's path."""
    ours = f"custom_nodes/{LINK_NAME}"
    return any(
        "(IMPORT FAILED)" in line and line.rstrip().replace("\\", "/").endswith(ours) for line in log_text.splitlines()
    )


def _pin(cores: int):
    if cores <= 0 or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    return lambda: os.sched_setaffinity(0, cpus)


def _picture(path: Path) -> None:
    """A 96x96 RGBA picture of an orange ellipse on transparency (LoadImage's mask = 1 - alpha)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((20, 12, 76, 84), fill=(190, 70, 40, 255))
    img.save(path)


def _wait(base: str, pid: str, proc, timeout: float, log_path: Path) -> tuple[dict | None, str]:
    t0 = time.monotonic()
    while True:
        hist = _get(f"{base}/history/{pid}")
        if pid in hist:
            return hist[pid], ""
        if proc.poll() is not None:
            return None, f"ComfyUI died while running; log tail: {log_path.read_text()[-1500:]}"
        if time.monotonic() - t0 > timeout:
            _post(f"{base}/interrupt", {})
            for _ in range(240):  # let the interrupted prompt leave the queue before the next one is sent
                if pid in _get(f"{base}/history/{pid}") or proc.poll() is not None:
                    break
                time.sleep(0.5)
            return None, f"did not finish within {timeout:.0f} s (interrupted)"
        time.sleep(0.5)


def run_workflow(base, name, wf, graphs, ours, info, out_dir, proc, timeout, max_seconds, log_path) -> dict:
    prompt = graphs.to_api_prompt(wf, ours, MODEL_CHOICE)
    why = skip_reason(prompt, info)
    if why:
        return {"name": name, "result": "SKIP", "why": why}
    t0 = time.monotonic()
    try:
        pid = _post(
            f"{base}/prompt",
            {"prompt": prompt, "client_id": "d3ds2-headless", "extra_data": {"extra_pnginfo": {"workflow": wf}}},
        )["prompt_id"]
    except urllib.error.HTTPError as e:
        return {"name": name, "result": "FAIL", "why": f"/prompt refused it: {e.read().decode()[:1500]}"}
    entry, err = _wait(base, pid, proc, timeout, log_path)
    seconds = time.monotonic() - t0
    if entry is None:
        return {"name": name, "result": "FAIL", "seconds": seconds, "why": err}
    status = entry.get("status", {})
    if status.get("status_str") == "error":
        msgs = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
        why = "; ".join(f"{m.get('node_type')}: {m.get('exception_message', '').strip()}" for m in msgs)
        return {"name": name, "result": "FAIL", "seconds": seconds, "why": why or json.dumps(status)[:1500]}
    files = saved_meshes(entry, out_dir)
    if not files:
        return {"name": name, "result": "FAIL", "seconds": seconds, "why": "no mesh was saved"}
    faces = []
    for f in files:
        try:
            faces.append(mesh_faces(f))
        except Exception as e:  # noqa: BLE001  (one line per failure, not a traceback)
            return {"name": name, "result": "FAIL", "seconds": seconds, "why": f"{f.name}: {e}"}
    res = {"name": name, "seconds": seconds, "faces": faces, "files": [str(f.relative_to(out_dir)) for f in files]}
    if min(faces) == 0:
        return {**res, "result": "FAIL", "why": "a saved mesh has no faces"}
    if seconds > max_seconds:
        return {**res, "result": "FAIL", "why": f"took {seconds:.1f} s, over the {max_seconds:.0f} s budget"}
    return {**res, "result": "PASS"}


def _start(
    comfy_dir: Path, python: str, base_dir: Path, port: int, extra: list[str], cores: int, threads: int, log_path: Path
):
    cmd = [
        python,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base_dir),
        "--disable-auto-launch",
        "--dont-print-server",
        *extra,
    ]
    print("$", shlex.join(cmd), f"(cwd {comfy_dir})", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if threads > 0:  # read by PyTorch's OpenMP/MKL pools when ComfyUI imports torch
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, "w") as log:
        return subprocess.Popen(
            cmd, cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_pin(cores)
        )


def _check_nodes(info: dict, ours: dict) -> None:
    missing = sorted(set(ours) - set(info))
    if missing:
        raise SystemExit(f"FAIL: /object_info lacks {missing}")
    for node_id, d in ours.items():  # the server's view of each node agrees with our schema
        served = info[node_id]["input"]
        got = set(served.get("required", {})) | set(served.get("optional", {}))
        if got != {i.name for i in d.inputs}:
            declared = sorted(i.name for i in d.inputs)
            raise SystemExit(f"FAIL: {node_id} inputs served as {sorted(got)}, declared {declared}")
    print(f"/object_info lists all {len(ours)} D3DS2 nodes with their declared inputs", flush=True)


def run(
    comfy_dir: Path,
    python: str,
    timeout: float,
    max_seconds: float,
    cores: int,
    threads: int,
    extra_paths: list[str],
    only: list[str],
) -> tuple[list[dict], dict]:
    if not (comfy_dir / "main.py").is_file():
        raise SystemExit(f"FAIL: {comfy_dir} is not a ComfyUI checkout (no main.py).")
    graphs = _graphs()
    ours = graphs.our_nodes()
    base_dir = Path(tempfile.mkdtemp(prefix="d3ds2-comfy-"))
    (base_dir / "custom_nodes").mkdir()
    (base_dir / "custom_nodes" / LINK_NAME).symlink_to(REPO, target_is_directory=True)
    (base_dir / "input").mkdir()
    (base_dir / "user").mkdir()
    _picture(base_dir / "input" / "example.png")
    out_dir, log_path = base_dir / "output", base_dir / "comfyui.log"
    extra = [a for p in extra_paths for a in ("--extra-model-paths-config", str(Path(p).resolve()))]
    port = _free_port()
    proc = _start(comfy_dir, python, base_dir, port, extra, cores, threads, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"FAIL: ComfyUI exited with {proc.returncode}; log:\n{log_path.read_text()[-3000:]}")
            try:
                info = _get(f"{base}/object_info", timeout=30)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() - t0 > timeout:
                    raise SystemExit("FAIL: ComfyUI did not answer within the timeout.") from None
                time.sleep(1)
        stats = _get(f"{base}/system_stats")["system"]
        print(f"ComfyUI {stats.get('comfyui_version')} up after {time.monotonic() - t0:.1f} s", flush=True)
        log_text = log_path.read_text()
        if import_failed(log_text):
            raise SystemExit(f"FAIL: the pack failed to import:\n{log_text[-3000:]}")
        _check_nodes(info, ours)
        results = []
        for path in sorted((REPO / "example_workflows").glob("*.json")):
            if only and path.stem not in only:
                continue
            wf = json.loads(path.read_text())
            r = run_workflow(base, path.stem, wf, graphs, ours, info, out_dir, proc, timeout, max_seconds, log_path)
            results.append(r)
            detail = [f"{r['seconds']:.1f} s"] if "seconds" in r else []
            detail += [f"faces {r['faces']}"] if "faces" in r else []
            detail += [r["why"]] if "why" in r else []
            print(f"{r['result']} {r['name']}: {'; '.join(detail)}", flush=True)
        return results, stats
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def record(path: Path, results: list[dict], stats: dict, command: str, cores: int, threads: int, load: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = "\n".join(
        f"| {r['name']} | {r['result']} | {r['seconds']:.1f} | {', '.join(map(str, r.get('faces', [])))} | "
        f"{r.get('why', '')} |"
        if "seconds" in r
        else f"| {r['name']} | {r['result']} | - | - | {r.get('why', '')} |"
        for r in results
    )
    path.write_text(
        f"# Headless ComfyUI check: last recorded run\n\n"
        f"Written by `tools/comfyui_headless_check.py --record`; rerun it before a release (see README).\n\n"
        f"* date: {now}\n* ComfyUI: {stats.get('comfyui_version')} (`--cpu`), PyTorch {stats.get('pytorch_version')}\n"
        f"* CPU: {_cpu_name()}, pinned to {cores} cores, "
        f"{threads if threads > 0 else 'default'} PyTorch thread(s); load average after the run: {load} "
        f"(the cores are shared with other jobs, so the times are upper bounds)\n* command: `{command}`\n"
        f"* each workflow is run unmodified except `Load Direct3D-S2 Model.variant = tiny-random`; "
        f"PASS = a saved mesh with faces in under the time budget; SKIP = this ComfyUI cannot run it "
        f"(a core node it lacks, or a model file it does not have: the text-to-image workflows need the SDXL "
        f"checkpoint, which `--extra-model-paths-config` can point to), so it is not a failure\n\n"
        f"| workflow | result | seconds | faces | note |\n|---|---|---|---|---|\n{rows}\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_DIR"), help="ComfyUI checkout")
    ap.add_argument(
        "--python",
        default=os.environ.get("COMFYUI_PYTHON", sys.executable),
        help="interpreter with ComfyUI's requirements",
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for startup and for each workflow")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="a PASS must finish within this")
    ap.add_argument("--cores", type=int, default=2, help="CPUs to pin ComfyUI to (0: no pinning)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="PyTorch threads in ComfyUI (OMP_NUM_THREADS; 0: PyTorch's default, one a core)",
    )
    ap.add_argument(
        "--extra-model-paths-config",
        action="append",
        default=[],
        metavar="YAML",
        help="ComfyUI extra_model_paths.yaml (e.g. one that has the SDXL checkpoint)",
    )
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this workflow (stem)")
    ap.add_argument("--record", type=Path, help="write the run as Markdown (e.g. tests/HEADLESS_CHECK.md)")
    args = ap.parse_args()
    if args.comfyui is None:
        raise SystemExit("FAIL: set COMFYUI_DIR or pass --comfyui to a ComfyUI checkout.")
    results, stats = run(
        Path(args.comfyui).resolve(),
        args.python,
        args.timeout,
        args.max_seconds,
        args.cores,
        args.threads,
        args.extra_model_paths_config,
        args.only,
    )
    if args.record:
        cmd = "python tools/comfyui_headless_check.py --comfyui <ComfyUI> --python <its python>" + "".join(
            f" --{k} {v}"
            for k, v in (
                ("cores", args.cores),
                ("threads", args.threads),
                ("max-seconds", f"{args.max_seconds:g}"),
                ("timeout", f"{args.timeout:g}"),
            )
        )
        load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
        record(args.record, results, stats, cmd, args.cores, args.threads, load)
    ok = any(r["result"] == "PASS" for r in results) and not any(r["result"] == "FAIL" for r in results)
    n = {k: sum(r["result"] == k for r in results) for k in ("PASS", "SKIP", "FAIL")}
    print("OK" if ok else "NOT OK", f"({n['PASS']} passed, {n['SKIP']} skipped, {n['FAIL']} failed)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
