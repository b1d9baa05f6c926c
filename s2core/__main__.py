"""`python -m s2core IMAGE -o mesh.glb`: see `s2core/cli.py`."""
import sys

from .cli import main

sys.exit(main())
