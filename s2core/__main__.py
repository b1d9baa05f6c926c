"""`python -m s2core IMAGE -o mesh.glb`: see `s2core/cli.py`."""
import sys

try:
    from .cli import main  # imports torch: seconds during which Ctrl-C may come
except KeyboardInterrupt:
    sys.stderr.write("\nInterrupted while starting; nothing was written.\n")
    sys.exit(130)

sys.exit(main())
