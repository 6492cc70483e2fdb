"""`dagster` with its process killed (SIGKILL) in the middle of a write under the data lake.

    LKG_KILL_AT=<path fragment> python -m lkg_pipeline_tests.killed_cli asset materialize ...

The first atomic write (`core.io.storage.replace_atomically` or `replace_dir_atomically`) whose
target path contains the fragment writes its new content in full beside the target and then
kills the process before the rename that would publish it: every step's work done, nothing
published, the moment that loses most. The patch is made before the code location is loaded,
so the `from core.io.storage import …` of every module binds the killing version, and the
in-process executor runs the steps in this process."""

import os
import signal
from collections.abc import Callable
from pathlib import Path

from lkg_pipeline.core.io import storage

FRAGMENT = os.environ["LKG_KILL_AT"]


def _killing(publish: Callable[[Path, Callable[[Path], None]], None]) -> Callable:
    def write(target: Path, fill: Callable[[Path], None]) -> None:
        def fill_then_die(staging: Path) -> None:
            fill(staging)
            if FRAGMENT in str(target):
                os.kill(os.getpid(), signal.SIGKILL)

        publish(target, fill_then_die)

    return write


storage.replace_atomically = _killing(storage.replace_atomically)
storage.replace_dir_atomically = _killing(storage.replace_dir_atomically)

if __name__ == "__main__":
    from dagster._cli import main

    main()
