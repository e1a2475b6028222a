"""A wall clock that a test can step, for alertbridge run as a child process with this directory
on PYTHONPATH: time.time() returns the real time plus the seconds written in the file named by
ALERTBRIDGE_TEST_CLOCK_STEP (read again whenever the file changes). Like an NTP step or a VM
restore, it moves the wall clock only; the monotonic clock goes on."""

import os
import time

_real_time = time.time
_path = os.environ.get("ALERTBRIDGE_TEST_CLOCK_STEP")
_seen = [None, 0.0]  # the file's (mtime_ns, size) last read, and its step


def _stepped():
    try:
        stat = os.stat(_path)
        if (stat.st_mtime_ns, stat.st_size) != _seen[0]:
            with open(_path) as fh:
                _seen[:] = [(stat.st_mtime_ns, stat.st_size), float(fh.read().strip() or 0)]
    except (OSError, ValueError):
        pass
    return _real_time() + _seen[1]


if _path:
    time.time = _stepped
