"""The vpns_jax command line: ``python -m vpns_jax.main --config=configs/<name>.py --workdir=DIR``.

With no ``--config`` it runs the offline default (configs/default.py). Fields
are overridden with ``--config.a.b=value``. Rerunning the same command on the
same workdir resumes where it stopped. Config files are Python and run as code:
use only ones you trust. For several processes (hosts), pass
``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or let
``jax.distributed.initialize`` find them on a managed cluster with
``--distributed``).
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import vpns_jax
from vpns_jax import cli

REPO = pathlib.Path(vpns_jax.__file__).resolve().parents[1]
# Config files import their shared base as `configs.base`.
sys.path.insert(0, str(REPO))

config_flags.DEFINE_config_file("config", str(REPO / "configs" / "default.py"), "Config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder (default: workdir/<config file name>).")
flags.DEFINE_bool("verbose", False, "Show tracebacks of errors.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the cluster's own settings.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for multi-process runs.")
flags.DEFINE_integer("process_id", None, "This process's index, for multi-process runs.")
FLAGS = flags.FLAGS


def _initialize_distributed() -> None:
    import jax

    if FLAGS.coordinator_address:
        # Only CPU collectives read this; set before any backend starts, as initialize() requires.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.verbose:
        logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every save and read at INFO
    try:
        _initialize_distributed()
        from vpns_jax import train

        config_path = pathlib.Path(FLAGS["config"].config_filename)
        workdir = FLAGS.workdir or str(pathlib.Path("workdir") / config_path.stem)
        results = train.run(FLAGS.config, workdir)
    except Exception as error:  # noqa: BLE001 - every failure is reported as one line unless --verbose
        return cli.report_error(error, verbose=FLAGS.verbose)
    import jax

    if jax.process_index() == 0:
        print(train.format_results(results))
        print(f"results: {pathlib.Path(workdir) / train.RESULTS_JSON}, {pathlib.Path(workdir) / train.RESULTS_CSV}")
    return 0


def run() -> None:
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
