"""`python -m s2core IMAGE -o mesh.glb`: see `s2core/cli.py`.

Importing the CLI imports torch (seconds): Ctrl-C or SIGTERM then also end in one line and exit 130 / 143.
"""

import signal
import sys

_terminated = []


def _on_sigterm(signum, frame):
    _terminated.append(signum)
    raise KeyboardInterrupt


_previous = signal.getsignal(signal.SIGTERM)
if _previous is not signal.SIG_IGN:
    signal.signal(signal.SIGTERM, _on_sigterm)
try:
    from .cli import main
except KeyboardInterrupt:
    sys.stderr.write(f"\n{'Terminated' if _terminated else 'Interrupted'} while starting; nothing was written.\n")
    sys.exit(143 if _terminated else 130)
if _previous is not signal.SIG_IGN:
    signal.signal(signal.SIGTERM, _previous if _previous is not None else signal.SIG_DFL)

sys.exit(main())
