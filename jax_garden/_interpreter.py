"""The command line that starts a child Python like this one.

Every child process the package starts (benchmark workers, the processes of a multi-process run)
runs ``sys.executable`` with this interpreter's own flags: ``-P`` above all, which keeps a source
checkout in the working directory from shadowing the installed package, and also ``-I``, ``-E``,
``-s``, ``-X`` and ``-W`` options. multiprocessing's spawn does the same for its children.
"""

from __future__ import annotations

import subprocess
import sys


def interpreter_flags() -> list[str]:
    """This interpreter's flags as command-line options (``-P``, ``-I``, ``-X dev``, ``-W...``)."""
    # The standard library's own reconstruction (multiprocessing's spawn and test.support use it).
    return list(subprocess._args_from_interpreter_flags())


def python_command(*args: str) -> list[str]:
    """``[sys.executable, <this interpreter's flags>, *args]``."""
    return [sys.executable, *interpreter_flags(), *args]
