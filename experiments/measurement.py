"""What a measurement or a results manifest ran on: commit, date, machine and package versions.

:func:`provenance` is the one record of it (a sweep's manifest holds it); :func:`header_lines` renders it as the
markdown preamble of a committed measurement, :func:`header` with a title. jax is asked in a short subprocess
unless the caller already runs it (``jax_in_process``): the sweep never imports jax, so it holds no accelerator
while its cells run.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
# The distributions whose versions are recorded (``python`` is the interpreter's own).
RECORDED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections",
                     "tensorflow-datasets")
# Prints jax's backend, its first device's kind and the device count as JSON; run in a subprocess (_jax_devices).
_JAX_DEVICE_PROBE = ("import json, jax; d = jax.devices(); print(json.dumps({'jax_backend': jax.default_backend(), "
                     "'device_kind': d[0].device_kind, 'device_count': len(d)}))")
PROBE_TIMEOUT_S = 300
_DEVICE_KEYS = ("jax_backend", "device_kind", "device_count")


def _git(*args: str) -> str | None:
    """``git -C REPO args``'s stripped output; None without git, outside a repository, or on an error."""
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """``git_commit``: HEAD of the repository holding this code; ``git_dirty``: whether a tracked file differs
    from it (untracked files do not count). Both None when it is not a git checkout of its own (no git, an
    exported tree, or a tree inside another repository)."""
    top = _git("rev-parse", "--show-toplevel")
    commit = _git("rev-parse", "HEAD") if top and pathlib.Path(top).resolve() == REPO else None
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    """The interpreter's version and each of :data:`RECORDED_PACKAGES`' installed versions (None if missing)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=1)
def _jax_devices() -> dict[str, Any]:
    """``jax_backend``, ``device_kind`` (of the first device) and ``device_count`` that jax finds in this
    environment, asked in a subprocess (which a sweep's cells inherit). Each is None when the probe fails.
    Cached: one probe a process."""
    found: Any = {}
    try:
        done = subprocess.run([sys.executable, "-c", _JAX_DEVICE_PROBE], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, check=False)
        if done.returncode == 0 and done.stdout.strip():
            found = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    found = found if isinstance(found, dict) else {}
    return {key: found.get(key) for key in _DEVICE_KEYS}


def _jax_devices_here() -> dict[str, Any]:
    """As :func:`_jax_devices`, from this process's jax (a second process could not open a device it holds)."""
    import jax  # noqa: PLC0415 - only callers that already run jax ask here

    devices = jax.devices()
    return {"jax_backend": jax.default_backend(), "device_kind": devices[0].device_kind,
            "device_count": len(devices)}


def cpu_model() -> str | None:
    """The CPU's model name, family/model/stepping and a digest of its feature flags (Linux's /proc/cpuinfo): CPU
    results can differ in the last bits from one CPU to another, so bit-level records name it."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or None
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return platform.processor() or None
    flags = hashlib.sha256(fields.get("flags", "").encode()).hexdigest()[:8]
    return (f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')} "
            f"stepping {fields.get('stepping', '?')}, flags {flags})")


def machine(*, jax_in_process: bool = False) -> dict[str, Any]:
    """The platform, the CPU model and count, and jax's backend, device kind and device count."""
    devices = _jax_devices_here() if jax_in_process else _jax_devices()
    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), **devices}


def provenance(*, jax_in_process: bool = False) -> dict[str, Any]:
    """What this process runs on: ``git_commit``, ``git_dirty``, ``packages``, ``machine`` and ``date`` (local
    time with its UTC offset). A value that cannot be found is None."""
    return {**git_state(), "packages": package_versions(), "machine": machine(jax_in_process=jax_in_process),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def header_lines(found: Mapping[str, Any], command: str) -> list[str]:
    """``command`` and the :func:`provenance` ``found`` as markdown list items: command, date, commit (marked when
    tracked files had changes), machine and package versions."""
    commit = found["git_commit"] or "unknown (not a git checkout)"
    if found["git_dirty"]:
        commit += " (with uncommitted changes)"
    where = found["machine"]
    devices = f"{where['device_count']} x {where['device_kind']}" if where["device_count"] else "devices unknown"
    packages = ", ".join(f"{name} {version or 'missing'}" for name, version in found["packages"].items())
    return [f"- command: `{command}`", f"- date: {found['date']}", f"- commit: {commit}",
            f"- machine: {where['platform']}, {where.get('cpu') or 'CPU'} x {where['cpu_count']} cores, jax backend "
            f"{where['jax_backend']} "
            f"({devices})", f"- packages: {packages}"]


def header(title: str, command: str, backend: str | None = None) -> str:
    """A markdown title and :func:`header_lines` of this process; ``backend`` names what the measured runs used
    when it is not this process's jax (e.g. subprocesses with gloo collectives)."""
    lines = header_lines(provenance(jax_in_process="jax" in sys.modules), command)
    if backend:
        lines.append(f"- measured runs: {backend} backend")
    return f"# {title}\n\n" + "\n".join(lines) + "\n\n"
