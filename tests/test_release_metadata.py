"""Registry readiness (pyproject `[project]` / `[tool.comfy]`, icon, changelog) and tooltips that quote
measured numbers rather than guesses."""

import importlib.util
import re
import sys
from pathlib import Path

import tomllib
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
META = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_project_table_is_complete():
    p = META["project"]
    assert re.fullmatch(r"[a-z][a-z0-9_.-]{0,98}", p["name"]) and "comfyui" not in p["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", p["version"])
    assert len(p["description"]) > 30 and p["license"] == {"text": "MIT"}  # a table, not a bare string
    assert p["urls"]["Repository"].startswith("https://github.com/")
    # dependencies = requirements.txt (the registry installs from pyproject, users from requirements.txt)
    reqs = [
        line.split(";")[0].strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "--"))
    ]
    assert sorted(d.split(";")[0].strip() for d in p["dependencies"]) == sorted(reqs)


def test_tool_comfy_table_and_icon():
    c = META["tool"]["comfy"]
    assert c["PublisherId"] and c["DisplayName"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", c["requires-comfyui"])
    repo_url = META["project"]["urls"]["Repository"].replace("https://github.com/", "")
    prefix = f"https://raw.githubusercontent.com/{repo_url}/main/"
    assert c["Icon"].startswith(prefix)
    icon = REPO / c["Icon"][len(prefix) :]
    with Image.open(icon) as im:  # the registry takes PNG/JPG/GIF/SVG up to 800x400
        assert im.format == "PNG" and im.width <= 800 and im.height <= 400
    assert icon.stat().st_size < 20_000
    assert "pytest" in META["tool"] and META["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_changelog_has_this_version():
    text = (REPO / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(META['project']['version'])} — \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M)


def test_memory_tooltips_quote_the_measured_numbers():
    spec = importlib.util.spec_from_file_location("d3ds2_stub_loader", REPO / "tests" / "stubs" / "pack.py")
    stubs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stubs)
    stubs.load_pack(v3=False)
    try:
        nodes = sys.modules[f"{stubs.NAME}.nodes"].NODES
        tips = " ".join(i.tooltip for n in nodes for i in n.inputs)
    finally:
        stubs.unload()
    assert not re.search(r"\b(24|16|10) GB\b", tips)  # the old guesses
    readme = (REPO / "README.md").read_text()
    for number in ("4.2 GiB", "4.1 GiB"):  # README's measured peaks (bench/results/e2e.md)
        assert number in tips and number in readme
