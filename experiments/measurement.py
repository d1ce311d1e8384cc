"""The preamble of a committed measurement file: what ran, when, on which commit and machine."""

from __future__ import annotations

import datetime
import os
import platform

from experiments import sweep


def header(title: str, command: str, backend: str = "CPU") -> str:
    """A markdown title and the command, date, commit (marked when the tree had uncommitted changes) and
    machine of this measurement; ``backend`` names the JAX backend the measured runs used."""
    state = sweep.git_state()
    commit = (state["git_commit"] or "unknown")[:7] + (" (with uncommitted changes)" if state["git_dirty"] else "")
    return (f"# {title}\n\ncommand: `{command}`  \n"
            f"date: {datetime.datetime.now().isoformat(timespec='seconds')}  \ncommit: {commit}  \n"
            f"machine: {platform.machine()}, {os.cpu_count()} cores, {backend} backend, Python "
            f"{platform.python_version()}\n\n")
