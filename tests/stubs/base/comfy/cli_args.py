"""Stand-in for comfy.cli_args: the parsed flags the nodes read."""

from types import SimpleNamespace

args = SimpleNamespace(disable_metadata=False)
