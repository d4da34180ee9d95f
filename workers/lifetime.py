"""Child processes that never outlive their parent, even when the parent is killed with -9."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: ask Linux to SIGTERM this child when its parent exits (no-op elsewhere).

    Linux ties this to the thread that forked, so call Popen from a thread that lives as long as
    the child should (the main thread, in every caller).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
