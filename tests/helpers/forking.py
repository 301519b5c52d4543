"""Run a function in a forked child with a fault injected ($PROGDISTILL_FAULT), as a kill -9 would end it."""

import os

from progdistill.store import faults


def in_child(fn, fault: str = "") -> int:
    """Run fn() in a forked process with $PROGDISTILL_FAULT; its exit status (137: it died at the fault)."""
    pid = os.fork()
    if pid == 0:   # the child never returns into pytest
        code = 0
        try:
            os.environ[faults.ENV] = fault
            faults.active.cache_clear()
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
