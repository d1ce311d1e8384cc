"""The vpns_jax command line: ``python -m vpns_jax.main --config=configs/<name>.py[:ARG] --workdir=DIR``.

With no ``--config`` it runs the offline default (configs/default.py). The text
after a ``:`` goes to the file's ``get_config(ARG)`` (ml_collections' convention):
a method for configs/default.py (``configs/default.py:hydra``), a model for the
dataset configs (``configs/cifar100.py:resnet50``). Without ``--workdir`` the run
goes to ``workdir/<config file stem>``, or ``workdir/<stem>_<ARG>`` with an ARG.
Fields are overridden with ``--config.a.b=value``. Rerunning the same command on the
same workdir resumes where it stopped. Config files are Python and run as code:
use only ones you trust. For several processes (hosts), pass
``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or let
``jax.distributed.initialize`` find them on a managed cluster with
``--distributed``); such a run is watched by a small parent process, so that a lost
peer process ends the others with one line (see vpns_jax/distributed.py).

Every failure, from a mistyped flag to a corrupted checkpoint, is one line on
stderr and exit status 2 (with its traceback first under ``--verbose``).
"""

from __future__ import annotations

import pathlib
import sys
import traceback

from absl import flags, logging
from ml_collections import config_flags

import vpns_jax
from vpns_jax import cli, distributed, supervisor

REPO = pathlib.Path(vpns_jax.__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.py"
HELP_FLAGS = ("--help", "-h", "--helpfull", "--helpshort", "-help")


class CommandLineError(ValueError):
    """The command line cannot be parsed: an unknown flag, a bad value, a missing or broken config file."""


def define_flags(argv: list[str]) -> flags.FlagValues:
    """This command's flags, on a fresh ``FlagValues`` (so that a process can parse several command lines).

    ml_collections reads the ``--config.a.b`` overrides from ``argv`` itself when the config file loads.
    """
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Config file (Python, run as code).",
                                    flag_values=values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Output folder (default: workdir/<config file stem>, or "
                        "workdir/<stem>_<ARG> for --config=FILE.py:ARG).", flag_values=values)
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
    flags.DEFINE_integer("heartbeat_timeout_s", 100, "Multi-process runs: a process silent this long is taken for "
                         "lost, and the others end within about this long of losing it.", lower_bound=1,
                         flag_values=values)
    return values


def _config_path(argv: list[str]) -> str:
    """The ``--config`` value ``argv`` gives (the last ``--config=``/``--config PATH``, with any ``:ARG``), else
    the default config file."""
    path = str(DEFAULT_CONFIG)
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            path = arg.split("=", 1)[1]
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            path = argv[i + 1]
    return path


def split_config_arg(config: str) -> tuple[str, str | None]:
    """``'configs/x.py:ARG'`` -> ``('configs/x.py', 'ARG')``; ``'configs/x.py'`` -> ``('configs/x.py', None)``.

    Splits where ml_collections does (the first ``:``, the rest is ARG even if it holds a ``:``), but only
    when the part before it is a ``.py`` file name: any other ``:`` belongs to the path.
    """
    path, colon, arg = config.partition(":")
    if colon and path.endswith(".py"):
        return path, arg
    return config, None


def default_workdir(config: str) -> str:
    """The workdir of a run without ``--workdir``: ``workdir/<config file stem>``, ``workdir/<stem>_<ARG>`` for
    ``--config=FILE.py:ARG`` (e.g. ``workdir/default_hydra``; an empty ARG counts as none)."""
    path, arg = split_config_arg(config)
    name = pathlib.Path(path).stem + (f"_{arg}" if arg else "")
    return str(pathlib.Path("workdir") / name)


def _error_chain(error: BaseException) -> list[BaseException]:
    """``error``, then the exception it was raised from or while handling, and so on."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and not any(current is seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _raised_in_get_config(error: BaseException) -> bool:
    """Whether ``error`` came out of a config file's ``get_config`` (not out of applying an override)."""
    return any(frame.name == "get_config" for frame in traceback.extract_tb(error.__traceback__))


def _config_file_error(error: flags.Error, config: str) -> CommandLineError | None:
    """The one-line error for an exception the config file's ``get_config`` raised, which ml_collections
    re-raises with the whole traceback in its message (absl wrapping that in a flag error); None for
    other flag errors."""
    chain = _error_chain(error)
    if not any(str(link).startswith("Error whilst parsing config file") for link in chain):
        return None
    original, text = chain[-1], _innermost_text(chain[-1])
    path, arg = split_config_arg(config)
    if arg is not None and isinstance(original, TypeError) and "get_config()" in text and "positional" in text:
        return CommandLineError(f"--config={config}: config file {path} takes no ':ARG' (its get_config() has no "
                                f"parameter): give --config={path}")
    if arg is not None and isinstance(original, ValueError):
        return CommandLineError(f"--config={config}: {text}")
    return CommandLineError(f"config file {config} does not load: {type(original).__name__}: {text}")


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
    from vpns_jax.config_fields import RENAMED_FIELDS, renamed_field_error  # here: main's import stays light

    argv = _last_override_wins(argv)
    for arg in argv:
        path, _, value = arg.removeprefix("--config.").partition("=")
        if arg.startswith("--config.") and path in RENAMED_FIELDS:
            raise CommandLineError(str(renamed_field_error(path, value)))
    config_path = _config_path(argv)
    config_file, _ = split_config_arg(config_path)
    if not pathlib.Path(config_file).is_file():
        raise CommandLineError(f"config file {config_file} does not exist: give --config=configs/<name>.py[:ARG] "
                               "(the files in configs/) or a path to your own")
    try:
        values = define_flags(argv)  # loads the default config file already
        rest = values(argv)
        values.config  # noqa: B018 - loads the config file (and its overrides) now, inside this try
    except flags.Error as error:
        raise (_config_file_error(error, config_path) or CommandLineError(f"{error} (see --helpfull)")) from error
    except (AttributeError, KeyError) as error:
        if _raised_in_get_config(error):  # e.g. ml_collections' dict-of-configs pattern on an unknown ARG
            raise CommandLineError(f"config file {config_path} does not load: {type(error).__name__}: "
                                   f"{_innermost_text(error)}") from error
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


def _close_progress_bars() -> None:
    """No progress bar is redrawn after the last message of a stopped or failed run."""
    from vpns_jax.io import metrics

    metrics.close_progress_bars()


def command(argv: list[str]) -> int:
    """Runs the command line ``argv`` (program name first); returns the exit status (0, or 2 after a one-line
    error on stderr)."""
    verbose = any(arg in ("--verbose", "-verbose", "--verbose=true", "--verbose=True") for arg in argv)
    multi_process = False
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(define_flags(argv).get_help())
        return 0
    try:
        values = parse_flags(argv)
        multi_process = bool(values.coordinator_address or values.distributed)
        if multi_process and not supervisor.supervised():
            return supervisor.supervise(argv, values.process_id, values.num_processes)
        supervisor.watch_parent()
        if not values.verbose:
            logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every save and read at INFO
        if multi_process:
            distributed.initialize(values.coordinator_address, values.num_processes, values.process_id,
                                   heartbeat_timeout_s=values.heartbeat_timeout_s)
        from vpns_jax import train
        from vpns_jax.io import workdir as workdir_files

        workdir = values.workdir or default_workdir(values["config"].config_filename)
        with cli.stop_requests():
            results = train.run(values.config, workdir, replace_workdir=values.replace_workdir)
    except (KeyboardInterrupt, cli.Stopped, cli.Interrupted) as stop:
        _close_progress_bars()
        if verbose:
            traceback.print_exception(stop)
        return cli.report_interrupt(stop)
    except Exception as error:  # noqa: BLE001 - every failure is reported as one line unless --verbose
        _close_progress_bars()
        if multi_process and distributed.peer_lost(error):
            if cli.requested_stop() is not None:  # this process was stopping too: the peer only stopped first
                return cli.report_interrupt(cli.Interrupted(cli.requested_stop(), "after a peer process stopped"))
            if verbose:
                traceback.print_exception(error)
            print(distributed.peer_lost_message(values.process_id, values.num_processes, str(error)),
                  file=sys.stderr)
            return distributed.EXIT_PEER_LOST
        return cli.report_error(error, verbose=verbose)
    import jax

    if jax.process_index() == 0:
        print(workdir_files.format_results(results))
        print(f"results: {pathlib.Path(workdir) / workdir_files.RESULTS_JSON}, "
              f"{pathlib.Path(workdir) / workdir_files.RESULTS_CSV}")
    return 0


def run() -> None:
    """The console entry point: ``command(sys.argv)`` as the exit status."""
    logging.use_absl_handler()
    status = command(sys.argv)
    if status and distributed.started():
        distributed.exit_now(status)  # not through the runtime's shutdown barrier, which a lost peer never reaches
    sys.exit(status)


if __name__ == "__main__":
    run()
