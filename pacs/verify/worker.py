"""The verifier's worker: a separate interpreter that ``pacs.verify`` starts and talks to over its stdin and stdout.

It is started as ``python -c "<bootstrap>" <sys.path entries>`` (see ``pacs.verify.pool._command``), never through
multiprocessing, so it never imports the caller's ``__main__``. Messages are ``multiprocessing.connection``
frames (length-prefixed pickles): it sends ``"ready"`` once sympy is imported, then answers each
``(response, gold, last_number)`` request with a bool. It exits when its stdin reaches end of file, i.e. when the
parent closes the pipe or dies; on a timeout the parent kills it.
"""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing.connection import Connection


def main() -> None:
    # The parent ends this process (end of file on stdin, or a kill); a Ctrl-C in the terminal is for the parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = Connection(os.dup(0), writable=False)
    replies = Connection(os.dup(1), readable=False)
    # Nothing printed by sympy or a library may reach the protocol pipe: fd 1 and sys.stdout go to stderr.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull)  # noqa: SIM115
    sys.stdout = sys.stderr

    import pacs.verify.compare  # noqa: F401  (import sympy before reporting ready)
    from pacs.verify.pipeline import judge

    replies.send("ready")
    while True:
        try:
            response, gold, last_number = requests.recv()
        except (EOFError, OSError):  # the parent closed the pipe or died: nothing to flush, skip the slow teardown
            os._exit(0)
        except Exception:  # a request that does not unpickle: answer it, stay in step with the parent
            replies.send(False)
            continue
        try:
            verdict = bool(judge(response, gold, last_number))
        except Exception:  # the contract is a bool for any input
            verdict = False
        try:
            replies.send(verdict)
        except OSError:  # the parent is gone
            os._exit(0)


if __name__ == "__main__":
    main()
