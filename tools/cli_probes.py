"""Run the command-line probes of issue 19 against the real `python -m s2core` (the `--demo` model, CPU) and
check each: exit status, one line on stderr, no traceback, no temp file, the old file kept.

    python tools/cli_probes.py            # prints one line per probe and exits 1 if any failed

Disk full and a read-only file system cannot be produced here without root mounts; `tests/` simulates them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def cli(args, cwd: Path, sig=None, after: float = 0.0) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.Popen(
        [sys.executable, "-m", "s2core", *map(str, args), "-q"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if sig is not None:
        time.sleep(after)
        p.send_signal(sig)
    _, err = p.communicate(timeout=600)
    return p.returncode, err.strip()


def main() -> int:
    d = Path(tempfile.mkdtemp(prefix="s2probes-"))
    rgba = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    rgba.paste((200, 60, 40, 255), (24, 16, 72, 80))
    rgba.save(d / "obj.png")
    data = (d / "obj.png").read_bytes()
    (d / "cut.png").write_bytes(data[: len(data) // 2])
    m16 = np.zeros((96, 96), np.uint16)
    m16[16:80, 24:72] = 65535
    Image.fromarray(m16).save(d / "mask16.png")
    Image.new("L", (12000, 12000), 0).save(d / "bomb.png")  # 144 M pixels: over the 134 M limit
    big = Image.new("RGBA", (10000, 10000), (0, 0, 0, 0))
    big.paste((200, 60, 40, 255), (2500, 2000, 7500, 8000))
    big.save(d / "big.png", compress_level=1)
    del big
    (d / "dir.glb").mkdir()
    (d / "old.glb").write_bytes(b"old mesh")
    demo = ["--demo", "--steps", "2,2,2"]
    probes = [  # (name, args, expected exit status, words in the one line, signal, delay)
        ("bomb", ["bomb.png", "-o", "a.glb", *demo], 1, "more than the 134 million this reader decodes", None, 0),
        ("truncated image", ["cut.png", "-o", "b.glb", *demo], 1, "is damaged or incomplete", None, 0),
        ("truncated mask", ["obj.png", "--mask", "cut.png", "-o", "c.glb", *demo], 1, "damaged or incomplete", None, 0),
        (
            "output is a folder",
            ["obj.png", "-o", "dir.glb", "--overwrite", *demo],
            1,
            "is a folder, not a file",
            None,
            0,
        ),
        ("name too long", ["obj.png", "-o", "n" * 300 + ".glb", *demo], 1, "bytes long, more than the file", None, 0),
        (
            "existing, no --overwrite",
            ["obj.png", "-o", "old.glb", *demo],
            1,
            "already exists; pass --overwrite",
            None,
            0,
        ),
        ("--device cuda", ["obj.png", "-o", "e.glb", "--device", "cuda", *demo], 1, "asks for a CUDA GPU", None, 0),
        (
            "--guidance inf",
            ["obj.png", "-o", "f.glb", "--guidance", "inf", *demo],
            1,
            "guidance must be a finite",
            None,
            0,
        ),
        (
            "--mc-threshold nan",
            ["obj.png", "-o", "g.glb", "--mc-threshold", "nan", *demo],
            1,
            "must be a finite",
            None,
            0,
        ),
        ("image is a folder", ["dir.glb", "-o", "h.glb", *demo], 1, "is a folder; give the path of an image", None, 0),
        ("16-bit mask", ["obj.png", "--mask", "mask16.png", "-o", "i.glb", *demo], 0, "", None, 0),
        ("10000² image", ["big.png", "-o", "j.glb", *demo], 0, "", None, 0),
        ("Ctrl-C at start-up", ["obj.png", "-o", "k.glb", *demo], 130, "Interrupted", signal.SIGINT, 0.5),
        ("SIGTERM while running", ["obj.png", "-o", "l.glb", *demo], 143, "Terminated", signal.SIGTERM, 6.0),
    ]
    failed = 0
    for name, args, code, words, sig, after in probes:
        rc, err = cli(args, d, sig, after)
        temps = [p.name for p in d.rglob("*.tmp")]
        lines = [line for line in err.splitlines() if line.strip()]
        ok = (
            rc == code
            and "Traceback" not in err
            and not temps
            and (d / "old.glb").read_bytes() == b"old mesh"
            and (code == 0 or (len(lines) == 1 and words in err))
        )
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name:26s} exit {rc:4d}  {lines[-1][:110] if lines else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
