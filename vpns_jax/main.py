"""The vpns_jax command line: ``python -m vpns_jax.main --config=configs/<name>.py --workdir=DIR``.

With no ``--config`` it runs the offline default (configs/default.py). Fields
are overridden with ``--config.a.b=value``. Rerunning the same command on the
same workdir resumes where it stopped. Config files are Python and run as code:
use only ones you trust. For several processes (hosts), pass
``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or let
``jax.distributed.initialize`` find them on a managed cluster with
``--distributed``).

Every failure, from a mistyped flag to a corrupted checkpoint, is one line on
stderr and exit status 2 (with its traceback first under ``--verbose``).
"""

from __future__ import annotations

import pathlib
import sys

from absl import flags, logging
from ml_collections import config_flags

import vpns_jax
from vpns_jax import cli

REPO = pathlib.Path(vpns_jax.__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.py"
HELP_FLAGS = ("--help", "-h", "--helpfull", "--helpshort", "-help")
# Config files import their shared base as `configs.base`.
sys.path.insert(0, str(REPO))


class CommandLineError(ValueError):
    """The command line cannot be parsed: an unknown flag, a bad value, a missing or broken config file."""


def define_flags(argv: list[str]) -> flags.FlagValues:
    """This command's flags, on a fresh ``FlagValues`` (so that a process can parse several command lines).

    ml_collections reads the ``--config.a.b`` overrides from ``argv`` itself when the config file loads.
    """
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Config file (Python, run as code).",
                                    flag_values=values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Output folder (default: workdir/<config file name>).", flag_values=values)
    flags.DEFINE_bool("replace_workdir", False,
                      "When the workdir holds a run of another config, move that run into WORKDIR/replaced/<time>/ "
                      "and start afresh (nothing is deleted).", flag_values=values)
    flags.DEFINE_bool("verbose", False, "Show tracebacks of errors.", flag_values=values)
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the cluster's own settings.",
                      flag_values=values)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.",
                        flag_values=values)
    flags.DEFINE_integer("num_processes", None, "Number of processes, for multi-process runs.", flag_values=values)
    flags.DEFINE_integer("process_id", None, "This process's index, for multi-process runs.", flag_values=values)
    return values


def _config_path(argv: list[str]) -> str:
    """The config file ``argv`` names (the last ``--config=``/``--config PATH``), else the default."""
    path = str(DEFAULT_CONFIG)
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            path = arg.split("=", 1)[1]
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            path = argv[i + 1]
    return path


def _innermost_text(error: BaseException) -> str:
    """The message of ``error``, unwrapped from the KeyError/AttributeError nesting ml_collections raises."""
    text: object = error
    while isinstance(text, BaseException) and len(text.args) == 1:
        text = text.args[0]
    return str(text)


def _last_override_wins(argv: list[str]) -> list[str]:
    """``argv`` with only the last ``--config.a.b=value`` of each field: absl would join repeated overrides
    of a tuple field (``densities``) into one tuple instead of taking the last, as it does for the others."""
    last = {arg.split("=", 1)[0]: i for i, arg in enumerate(argv) if arg.startswith("--config.") and "=" in arg}
    return [arg for i, arg in enumerate(argv)
            if not (arg.startswith("--config.") and "=" in arg) or last[arg.split("=", 1)[0]] == i]


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """The parsed flags of ``argv`` (program name first; a repeated ``--config.`` override takes its last
    value); :class:`CommandLineError` names what is wrong."""
    argv = _last_override_wins(argv)
    config_path = _config_path(argv)
    if not pathlib.Path(config_path).is_file():
        raise CommandLineError(f"config file {config_path} does not exist: give --config=configs/<name>.py "
                               "(the files in configs/) or a path to your own")
    try:
        values = define_flags(argv)  # loads the default config file already
        rest = values(argv)
        values.config  # noqa: B018 - loads the config file (and its overrides) now, inside this try
    except flags.Error as error:
        raise CommandLineError(f"{error} (see --helpfull)") from error
    except (AttributeError, KeyError) as error:
        raise CommandLineError(f"an override names a field that {config_path} does not have: "
                               f"{_innermost_text(error)}") from error
    except Exception as error:  # noqa: BLE001 - running the config file can raise anything
        raise CommandLineError(f"config file {config_path} does not load: {type(error).__name__}: "
                               f"{_innermost_text(error)}") from error
    if len(rest) > 1:
        raise CommandLineError(f"unexpected arguments {' '.join(rest[1:])!r}: flags take the form --name=value")
    if values.coordinator_address and (values.num_processes is None or values.process_id is None):
        raise CommandLineError("--coordinator_address needs --num_processes and --process_id as well")
    return values


def _initialize_distributed(values: flags.FlagValues) -> None:
    import jax

    if values.coordinator_address:
        # Only CPU collectives read this; set before any backend starts, as initialize() requires.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=values.coordinator_address,
                                   num_processes=values.num_processes, process_id=values.process_id)
    elif values.distributed:
        jax.distributed.initialize()


def command(argv: list[str]) -> int:
    """Runs the command line ``argv`` (program name first); returns the exit status (0, or 2 after a one-line
    error on stderr)."""
    verbose = any(arg in ("--verbose", "-verbose", "--verbose=true", "--verbose=True") for arg in argv)
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(define_flags(argv).get_help())
        return 0
    try:
        values = parse_flags(argv)
        if not values.verbose:
            logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every save and read at INFO
        _initialize_distributed(values)
        from vpns_jax import train

        config_path = pathlib.Path(values["config"].config_filename)
        workdir = values.workdir or str(pathlib.Path("workdir") / config_path.stem)
        results = train.run(values.config, workdir, replace_workdir=values.replace_workdir)
    except Exception as error:  # noqa: BLE001 - every failure is reported as one line unless --verbose
        return cli.report_error(error, verbose=verbose)
    import jax

    if jax.process_index() == 0:
        print(train.format_results(results))
        print(f"results: {pathlib.Path(workdir) / train.RESULTS_JSON}, {pathlib.Path(workdir) / train.RESULTS_CSV}")
    return 0


def run() -> None:
    """The console entry point: ``command(sys.argv)`` as the exit status."""
    logging.use_absl_handler()
    sys.exit(command(sys.argv))


if __name__ == "__main__":
    run()
