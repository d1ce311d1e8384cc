"""One command that measures this project on whatever accelerator is present, and writes a markdown table.

    python benchmarks/device_check.py --out=device_check.md [--budget_s 450] [--torch_device auto] [--smoke]

Reports the device, then for ResNet-18 at 224 px (ImageNet stem, batch 128) and at 32 px (CIFAR stem, batch 256):
the dense step, the VPNs stage-1 and stage-2 iterations and the eval step (compile s, median s, images/s, XLA's
peak-memory estimate) in float32 with each conv kernel (``lax``, ``im2col``) and in bfloat16 with ``auto``. Next
to them, where torch is installed and sees a CUDA device, the PyTorch reference (benchmarks/torch_reference.py,
the authors' semantics) on the same card, channels_last, in float32 and under bfloat16 autocast: conv column
``torch, channels_last``, peak MiB from ``torch.cuda.max_memory_allocated``; otherwise one line says why it was
skipped. Then the input pipeline's augmented images/s at both sizes with in-process threads, one worker process
and the ``data.workers`` auto count, and the offline default's wall time end to end (``python -m vpns_jax.main``,
in a temporary workdir).

``--budget_s`` bounds the whole run: a piece of work starts only while one like the last of its kind still fits
(rows past that are listed as skipped), and the subprocesses (the PyTorch reference, the end-to-end run) are
stopped when the budget runs out, so the command ends in time on a slow device. The PyTorch reference runs in a
process of its own: JAX and torch each load and check their own cuDNN, which one process cannot hold twice.

``--smoke`` runs a tiny setting on any backend (width 1/16, 32 px, batch 2, one timed call per program, no
end-to-end run): all five programs with the first kernel choice, the dense step only with the others, so each
kernel choice is still compiled and run. The test suite runs it in a subprocess. Where a piece cannot run
(no prepared Fashion-MNIST, no TFDS, no torch), its line says why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:  # run as `python benchmarks/device_check.py`: the repository's experiments
    sys.path.append(str(ROOT))
from step_time import dense_step, jax_rows, time_call  # noqa: E402 - benchmarks/ is not a package

from experiments import measurement  # noqa: E402

SETTINGS = {"full": [("imagenet", 224, 128), ("cifar", 32, 256)], "smoke": [("imagenet", 32, 2)]}
# Kernel choices per setting: the conv kernels in float32, bfloat16 with the backend's default kernels.
KERNELS = [{"dtype": "float32", "conv_impl": "lax", "pool_impl": "auto"},
           {"dtype": "float32", "conv_impl": "im2col", "pool_impl": "auto"},
           {"dtype": "bfloat16", "conv_impl": "auto", "pool_impl": "auto"}]
# The PyTorch reference's precisions: (dtype column, torch_reference.py --autocast).
TORCH_PRECISIONS = [("float32", "none"), ("bfloat16", "bf16")]
TORCH_CONV = "torch, channels_last"
HEADER = ["| setting | dtype | conv | step | compile s | median s | images/s | peak MiB |",
          "| :-- | :-- | :-- | :-- | --: | --: | --: | --: |"]


class Budget:
    """The run's time budget. Each kind of work (a JAX kernel group, a PyTorch run, ...) starts only while the
    last one of its kind would still fit, so the run overshoots by misprediction only, not by a whole group."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds
        self.last: dict[str, float] = {}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, kind: str) -> bool:
        return self.left() > self.last.get(kind, 0.0)

    def record(self, kind: str, started: float) -> None:
        self.last[kind] = time.perf_counter() - started


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else "no output"


def device_lines() -> list[str]:
    """The device, as JAX sees it (the machine and versions are in ``measurement.header_lines``)."""
    devices = jax.devices()
    lines = [f"- backend: {jax.default_backend()}, {len(devices)} x {devices[0].device_kind}"]
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and "bytes_limit" in stats:
        lines.append(f"- device memory: {stats['bytes_limit'] / 2**30:.1f} GiB")
    return lines


def _row(setting: str, dtype: str, conv: str, name: str, compile_s: str, median: float, images: float,
         peak: float | None) -> str:
    peak_text = "" if peak is None else f"{peak / 2**20:.1f}"
    return (f"| {setting} | {dtype} | {conv} | {name} | {compile_s} | {median:.4f} | {images:.0f} | "
            f"{peak_text} |")


def kernel_rows(stem: str, size: int, batch: int, kernels: dict[str, str], *, smoke: bool,
                all_programs: bool) -> list[str]:
    """Markdown rows of one kernel choice: every program, or (``all_programs`` False) the dense step only."""
    width, repeats = (1 / 16, 1) if smoke else (1.0, 2)
    if all_programs:
        rows = jax_rows("resnet18", width, stem, size, batch, repeats, 0.1, kernels=kernels)
    else:
        _, call, _, peak = dense_step("resnet18", width, stem, size, batch, kernels=kernels)
        compile_s, median = time_call(call, repeats)
        rows = [("dense train step", compile_s, median, batch / median, peak())]
    setting = f"{stem} {size} px, batch {batch}"
    return [_row(setting, kernels["dtype"], kernels["conv_impl"], name, f"{compile_s:.2f}", median, images, peak)
            for name, compile_s, median, images, peak in rows]


def _run_reference(stem: str, size: int, batch: int, device: str, autocast: str, *, smoke: bool,
                   timeout: float) -> dict:
    """benchmarks/torch_reference.py's JSON for one setting and precision; RuntimeError says why it failed.

    torch allocates from what this process's JAX left free (a quarter of the card, by JAX's default)."""
    width, repeats = (1 / 16, 1) if smoke else (1.0, 3)
    command = [sys.executable, str(HERE / "torch_reference.py"), f"--device={device}", "--channels_last",
               f"--autocast={autocast}", f"--stem={stem}", f"--size={size}", f"--batch={batch}",
               f"--width={width}", f"--repeats={repeats}", f"--threads={os.cpu_count() or 1}", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout, 1.0), check=False,
                          cwd=ROOT)
    if done.returncode:
        raise RuntimeError(_last_line(done.stderr))
    return json.loads(done.stdout.strip().splitlines()[-1])


class TorchReference:
    """The PyTorch reference's rows next to the JAX ones, and the report's line about them.

    ``choice``: ``auto`` (CUDA, if torch sees it), ``cuda``, ``cpu`` (to try the rows on a CPU-only machine)
    or ``none``. The first run decides: if it fails (no torch, no CUDA device, ...), no further run starts and
    the report says why in one line; a later failure (e.g. out of memory) is a row of its own."""

    def __init__(self, choice: str, smoke: bool) -> None:
        self.device, self.smoke, self.info = ("cuda" if choice == "auto" else choice), smoke, None
        self.skip = None
        if choice == "none":
            self.skip = "--torch_device=none"
        elif importlib.util.find_spec("torch") is None:
            self.skip = "torch is not installed"

    def rows(self, stem: str, size: int, batch: int, budget: Budget) -> list[str]:
        """The reference's rows at one setting, float32 then autocast bfloat16, within the budget."""
        setting, out = f"{stem} {size} px, batch {batch}", []
        for dtype, autocast in TORCH_PRECISIONS:
            if self.skip:
                break
            if not budget.fits("torch"):
                out.append(f"| {setting} | {dtype} | {TORCH_CONV} | skipped: time budget | | | | |")
                continue
            started = time.perf_counter()
            try:
                result = _run_reference(stem, size, batch, self.device, autocast, smoke=self.smoke,
                                        timeout=budget.left())
            except subprocess.TimeoutExpired:
                out.append(f"| {setting} | {dtype} | {TORCH_CONV} | stopped: time budget | | | | |")
                continue
            except (RuntimeError, ValueError) as error:  # ValueError: no JSON line
                if self.info is None:
                    self.skip = str(error)
                    break
                out.append(f"| {setting} | {dtype} | {TORCH_CONV} | failed: {error} | | | | |")
                continue
            budget.record("torch", started)
            self.info = f"torch {result['torch']} on {result['device']}"
            for name, median in result["median_s"].items():
                images = batch * (2 if name.startswith("VPNs") else 1) / median
                out.append(_row(setting, dtype, TORCH_CONV, name, "", median, images,
                                result["peak_bytes"].get(name)))
        return out

    def line(self) -> str:
        if self.skip:
            return f"- PyTorch reference: skipped ({self.skip})"
        if self.info is None:
            return "- PyTorch reference: not run (time budget)"
        autotuner = ", cuDNN autotuner on" if self.device.startswith("cuda") else ""
        return (f"- PyTorch reference: {self.info}, benchmarks/torch_reference.py in a process of its own, "
                f"channels_last, float32 and bfloat16 autocast{autotuner}; no compile s (an untimed warm-up call "
                f"each, which pays for any autotuning); rows `{TORCH_CONV}`")


def step_table(smoke: bool, budget: Budget, reference: TorchReference) -> list[str]:
    """Markdown rows of the step timings, per setting and kernel choice, then the PyTorch reference's."""
    rows = list(HEADER)
    for stem, size, batch in SETTINGS["smoke" if smoke else "full"]:
        for index, kernels in enumerate(KERNELS):
            if not budget.fits("jax"):
                rows.append(f"| {stem} {size} px, batch {batch} | {kernels['dtype']} | {kernels['conv_impl']} | "
                            "skipped: time budget | | | | |")
                continue
            started = time.perf_counter()
            # Smoke mode compiles the five programs once; the other kernel choices only their dense step.
            rows += kernel_rows(stem, size, batch, kernels, smoke=smoke, all_programs=not smoke or index == 0)
            budget.record("jax", started)
        rows += reference.rows(stem, size, batch, budget)
    return rows


def pipeline_rows(smoke: bool, data_dir: str | None, budget: Budget) -> list[str]:
    """Augmented images/s of the input pipeline at 32 and 224 px with in-process threads, one worker process and
    the ``data.workers`` auto count (the trainer's default here), or why it could not run."""
    try:
        from input_pipeline import view_rate  # noqa: PLC0415 - needs TFDS
        from vpns_jax.data import pipeline, registry, run_data  # noqa: PLC0415

        spec = registry.get_dataset_spec("fashion_mnist")
        registry.prepared_dir(spec, data_dir)
        source = pipeline.open_split("fashion_mnist", spec.train_split, data_dir)
    except Exception as error:  # noqa: BLE001 - any missing piece is reported, not fatal
        return [f"- input pipeline: skipped ({type(error).__name__}: {str(error).splitlines()[0][:160]})"]
    threads = os.cpu_count() or 1
    settings = [0, 1] if smoke else sorted({0, 1, max(1, run_data.worker_count(-1))})
    out = []
    for size in (32,) if smoke else (32, 224):
        for workers in settings:
            loader = f"{threads} threads" if workers == 0 else f"{workers} worker{'s' * (workers > 1)}"
            if not budget.fits("pipeline"):
                out.append(f"- input pipeline, {size} px, {loader}: skipped (time budget)")
                continue
            started = time.perf_counter()
            rate = view_rate(source, workers, size, 16 if smoke else 128, 2 if smoke else 10, threads)
            budget.record("pipeline", started)
            out.append(f"- input pipeline, {size} px, {loader}: {rate:.0f} augmented images/s")
    return out


def end_to_end_line(smoke: bool, budget: Budget) -> str:
    """The offline default's wall time, run as a user would (``python -m vpns_jax.main``), within the budget."""
    if smoke:
        return "- offline default end to end: not run in --smoke"
    if budget.left() <= 0:
        return "- offline default end to end: skipped (time budget)"
    # This process's JAX still holds the accelerator memory it preallocated (75% by default), so a second
    # process preallocating as much would fail at start: the run allocates as it goes instead.
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}
    with tempfile.TemporaryDirectory() as workdir:
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-m", "vpns_jax.main", "--config=configs/default.py",
                                   f"--workdir={workdir}"], capture_output=True, text=True, check=False, cwd=ROOT,
                                  env=env, timeout=budget.left())
        except subprocess.TimeoutExpired:
            return (f"- offline default end to end: stopped after {time.perf_counter() - started:.0f} s "
                    "(time budget), unfinished")
        seconds = time.perf_counter() - started
    if done.returncode:
        return f"- offline default end to end: failed ({_last_line(done.stderr)})"
    return f"- offline default end to end: {seconds:.0f} s (source pretraining and four densities)"


def main(argv: list[str] | None = None) -> str:
    """Runs the check; writes and returns the markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget_s", type=float, default=450.0,
                        help="time budget of the whole run (startup aside); work that would not fit is skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, on any backend, for the test suite")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir holding the prepared Fashion-MNIST")
    parser.add_argument("--torch_device", default="auto", choices=["auto", "cuda", "cpu", "none"],
                        help="the PyTorch reference's device (auto: CUDA when torch sees it, else skipped)")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    command = f"python benchmarks/device_check.py {' '.join(argv or sys.argv[1:])}"
    lines = ["# Device check", "", *measurement.header_lines(measurement.provenance(jax_in_process=True), command),
             *device_lines(), ""]
    reference = TorchReference(args.torch_device, args.smoke)
    lines += step_table(args.smoke, budget, reference) + [""]
    lines.append(reference.line())
    lines += pipeline_rows(args.smoke, args.data_dir, budget)
    lines.append(end_to_end_line(args.smoke, budget))
    text = "\n".join(lines) + "\n"
    pathlib.Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
