"""Issue 15 items 5 and 6: LoadImage's MASK conventions in the encode nodes, and user-facing messages that
name only inputs a node really has.

The message test reads every string literal (f-strings included) of nodes/ and s2core/ that ends up in an
exception or a log warning, takes each identifier-looking word it tells the user to set, switch, turn or
keep, and checks the word is an input of a node schema (or a CLI option). It caught two messages telling
users to "set invert_mask", which no node has.
"""

import ast
import re
from pathlib import Path

import pytest
import torch
from conftest import stubs

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

REPO = Path(__file__).resolve().parents[1]


def _jpg_like_picture():
    """An RGB product shot (no alpha) of 96x96, and the MASK LoadImage gives for it: 64x64 zeros."""
    img = torch.ones(1, 96, 96, 3)
    img[:, 20:76, 24:72] = torch.tensor([0.7, 0.3, 0.2])
    return img, torch.zeros(1, 64, 64)


@pytest.mark.parametrize("mask_is_background", [True, False])
def test_loadimage_no_alpha_mask_counts_as_no_mask(pack, mask_is_background):
    """The examples' wiring (LoadImage IMAGE + MASK into Encode Image) with a JPG failed with "The mask is
    64x64 but the image is 96x96"; now it equals encoding with nothing connected."""
    model = stubs.run_node(
        pack,
        "D3DS2LoadModel",
        variant="tiny-random",
        dense=True,
        sparse_512=False,
        sparse_1024=False,
        precision="fp32",
        allow_download=False,
    )[0]
    img, load_image_mask = _jpg_like_picture()
    wired = stubs.run_node(
        pack, "D3DS2EncodeImage", model=model, image=img, mask=load_image_mask, mask_is_background=mask_is_background
    )[0]
    alone = stubs.run_node(pack, "D3DS2EncodeImage", model=model, image=img)[0]
    assert torch.equal(wired.tokens, alone.tokens) and torch.equal(wired.patch_mask, alone.patch_mask)


def test_real_masks_are_still_used_and_inverted(pack):
    enc = pack.NODE_CLASS_MAPPINGS["D3DS2EncodeImage"].NODE
    object_mask = __import__(enc.__module__, fromlist=["object_mask"]).object_mask
    m = torch.zeros(1, 64, 64)
    m[:, 10:20, 10:20] = 1
    assert torch.equal(object_mask(m, True), 1 - m) and object_mask(m, False) is m
    assert object_mask(torch.zeros(1, 64, 64), True) is None and object_mask(None, True) is None
    assert torch.equal(object_mask(torch.zeros(1, 32, 32), False), torch.zeros(1, 32, 32))  # not LoadImage's


# ---------------------------------------------------------------------------------------------
# Messages name only real inputs

_VERBS = r"(?:set|switch|turn|keep|raise|lower|choose|connect|use)"
_NAME = r"`?([a-z][a-z0-9]*_[a-z0-9_]+)`?"  # snake_case words: input names look like this


def _user_strings():
    """(file, line, text) of string literals passed to raise/log.warning/log.error in nodes/ and s2core/."""
    out = []
    for path in sorted((REPO / "nodes").rglob("*.py")) + sorted((REPO / "s2core").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            call = None
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                call = node.exc
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("warning", "error")
            ):
                call = node
            if call is None:
                continue
            for arg in call.args:
                parts = [n.value for n in ast.walk(arg) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                if parts:
                    out.append((path.relative_to(REPO).as_posix(), node.lineno, "".join(parts)))
    return out


def _known_inputs(pack):
    names = set()
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        names |= {i.name for i in cls.NODE.inputs}
    cli = (REPO / "s2core" / "cli.py").read_text()
    names |= {m.replace("-", "_") for m in re.findall(r'"--([a-z0-9-]+)"', cli)}
    return names


def test_messages_collected_include_the_known_ones():
    texts = [t for _, _, t in _user_strings()]
    assert len(texts) > 100
    assert any("mask_is_background" in t for t in texts)  # the encode messages are seen by the collector


def test_messages_name_only_real_inputs(pack):
    known = _known_inputs(pack)
    bad = []
    for file, line, text in _user_strings():
        for m in re.finditer(rf"\b{_VERBS}\s+(?:the\s+)?{_NAME}", text):
            if m.group(1) not in known:
                bad.append(f"{file}:{line}: {m.group(0)!r}")
    assert not bad, "messages tell users to set inputs no node has:\n" + "\n".join(bad)
