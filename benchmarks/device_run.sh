#!/usr/bin/env bash
# The device check as one command on an accelerator machine, run from the repository root:
#
#     bash benchmarks/device_run.sh        # writes $OUT/device_check.md ($OUT defaults to ./device_out)
#
# Written for a GPU host without network access whose Python 3.12 has jax, flax, optax, orbax-checkpoint and torch
# (CUDA) but not the rest of this project's runtime dependencies. Copy them there as py3.12 wheels in a wheels
# folder .whl/ at the repository root (gitignored), fetched on a machine with PyPI, one `pip download` per
# NAME==VERSION:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl NAME==VERSION
#
# for tensorflow-datasets==4.9.10 ml-collections==1.1.0 array-record==0.8.6 dm-tree==0.1.10 attrs==26.1.0
# wrapt==2.5.2 immutabledict==4.3.1 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0
# toml==0.10.2 tqdm==4.70.1 six==1.17.0 simple-parsing==0.1.9 docstring-parser==0.18.0 einops==0.8.2
# pillow==13.0.0 tensorboardX==2.6.5 packaging==26.4 requests==2.34.2 urllib3==2.8.0 idna==3.20
# certifi==2026.10.19.post1 charset-normalizer==3.5.3 (about 18 MB). promise==2.3 exists on PyPI only as a
# source archive: build its pure-Python wheel with `python3 -m pip wheel --no-deps -w .whl promise==2.3`.
# pyarrow is left out on purpose: TFDS lists it, but reading and preparing array_record datasets never imports it,
# and its 55 MB wheel is the largest of all. These are the non-extra requirements of
# TFDS, ml_collections and array_record (plus PIL and tensorboardX, which the pipeline and the metrics writer
# import) that jax, flax, optax, orbax-checkpoint and torch do not already pull in.
#
# Fashion-MNIST: `python -m vpns_jax.data.prepare --manual_dir=DIR` reads Debian's four IDX files from DIR (else
# from /usr/share/datasets/fashion-mnist). Copy them to the host as .data/fashion-mnist (or point
# FASHION_MNIST_DIR at a copy); without either, the pipeline row and the end-to-end run say the data is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./device_out}"
mkdir -p "$OUT"
# The repository root first: vpns_jax is not installed there, and the subprocesses inherit the path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" > /dev/null; then
  # --target and PYTHONPATH instead of installing into the machine's environment, which is not ours to change.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

# The one prepared copy both the device check and its end-to-end run (data_dir '' = $TFDS_DATA_DIR) read.
export TFDS_DATA_DIR="${TFDS_DATA_DIR:-${HOME:-/tmp}/tensorflow_datasets}"
SOURCE="${FASHION_MNIST_DIR:-.data/fashion-mnist}"
[ -d "$SOURCE" ] || SOURCE=/usr/share/datasets/fashion-mnist
if [ -d "$SOURCE" ]; then
  # A failure here is reported by the check's pipeline row; the timings still run.
  python3 -m vpns_jax.data.prepare --dataset=fashion_mnist --data_dir="$TFDS_DATA_DIR" --manual_dir="$SOURCE" \
    || echo "device_run.sh: preparing Fashion-MNIST from $SOURCE failed; the check goes on without it" >&2
else
  echo "device_run.sh: no Fashion-MNIST files (.data/fashion-mnist, \$FASHION_MNIST_DIR or Debian's); skipping" >&2
fi

PYTHONUNBUFFERED=1 python3 benchmarks/device_check.py --out="$OUT/device_check.md" --data_dir="$TFDS_DATA_DIR" "$@"
