"""Prepare a dataset of the registry into a TFDS data dir (array_record files, no TensorFlow needed).

    python -m vpns_jax.data.prepare --dataset=NAME [--data_dir=DIR] [--manual_dir=DIR] [--download] [--force]
        [--verbose]
    python -m vpns_jax.data.prepare --dataset=NAME --convert [--data_dir=DIR]

Which datasets need ``--manual_dir`` or ``--download``, and what ``--force``, ``--convert`` and the staging folder
guarantee: docs/data.md, "Datasets". Errors are one line on stderr, exit code 2 (``--verbose`` adds the traceback).
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import shutil
import sys
import tempfile

from vpns_jax import cli
from vpns_jax.data import registry



def _local_builders() -> dict[str, type]:
    """This project's builders by TFDS name (imported lazily: TFDS is slow to import)."""
    from vpns_jax.data import builders

    return {cls.name: cls for cls in (builders.FashionMnistLocal, builders.SklearnDigits, builders.TinyImagenet)}


def _is_prepared(version_dir: pathlib.Path) -> bool:
    return (version_dir / "dataset_info.json").is_file()


def _builder_factory(spec: registry.DatasetSpec, manual: pathlib.Path | None, download: bool, force: bool):
    """A function data_dir -> this dataset's TFDS builder there; None when TFDS's own builder may not run."""
    import tensorflow_datasets as tfds

    local = _local_builders().get(spec.tfds_name)
    if local is None:
        if download:
            return lambda root: tfds.builder(spec.tfds_name, data_dir=str(root), file_format="array_record")
        if force:
            raise ValueError(f"--force prepares {spec.name!r} again from its source, which for TFDS's own "
                             f"builders needs --download: {spec.how_to_get}")
        return None
    if spec.tfds_name == "fashion_mnist_local" and manual is not None:
        from vpns_jax.data.builders.fashion_mnist_local import FILES, has_source_files

        if not has_source_files(manual):
            raise FileNotFoundError(f"--manual_dir {manual} holds none of the Fashion-MNIST files "
                                    f"({', '.join(n for pair in FILES.values() for n in pair)})")
    return lambda root: local(data_dir=str(root), file_format="array_record")


def _build_and_install(make_builder, root: pathlib.Path, version_dir: pathlib.Path,
                       manual: pathlib.Path | None) -> None:
    """Prepares the dataset in a staging folder, then renames it to ``version_dir`` (replacing one there).

    The staging folder ``<root>/.incomplete-<tfds_name>-*`` is outside where :func:`registry.prepared_dir` looks,
    so a failed preparation never passes for a finished one; an old ``version_dir`` is replaced only by a complete
    copy, so a failed ``--force`` leaves it as it was.
    """
    import tensorflow_datasets as tfds

    root.mkdir(parents=True, exist_ok=True)
    prefix = f".incomplete-{version_dir.relative_to(root).parts[0]}-"
    staging = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=root))  # in root: the renames stay on one disk
    try:
        builder = make_builder(staging)
        relative = pathlib.Path(str(builder.data_dir)).relative_to(staging)
        if root / relative != version_dir:
            raise RuntimeError(f"the builder prepares {relative}, expected {version_dir.relative_to(root)}")
        config = tfds.download.DownloadConfig(manual_dir=str(manual) if manual is not None else None)
        print(f"preparing {version_dir} (in {staging} until complete)...", flush=True)
        # TFDS's own progress lines name the staging folder as where the data is: left out, to not mislead.
        with contextlib.redirect_stdout(io.StringIO()):
            # Downloads (and TFDS's default manual dir, <data_dir>/downloads/manual) stay in the data dir.
            builder.download_and_prepare(download_dir=str(root / "downloads"), download_config=config)
        version_dir.parent.mkdir(parents=True, exist_ok=True)
        if version_dir.exists():
            version_dir.rename(staging / "replaced")
        (staging / relative).rename(version_dir)
    except BaseException:
        if (staging / "replaced").exists() and not version_dir.exists():  # the swap itself failed: undo it
            (staging / "replaced").rename(version_dir)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _prepare(
    name: str, data_dir: str | None, manual_dir: str | None, download: bool, force: bool = False
) -> tuple[pathlib.Path, str]:
    """(prepared version dir, what was done: 'prepared', 'replaced' or 'found')."""
    spec = registry.get_dataset_spec(name)
    root = registry.resolve_data_dir(data_dir)
    manual = pathlib.Path(manual_dir).expanduser() if manual_dir else None
    if manual is not None and not manual.is_dir():
        raise FileNotFoundError(f"--manual_dir {manual} is not a folder")
    make_builder = _builder_factory(spec, manual, download, force)
    if make_builder is None:
        try:
            return registry.prepared_dir(spec, str(root)), "found"
        except registry.DataNotFoundError:
            raise registry.DataNotFoundError(
                f"dataset {spec.name!r} (TFDS {spec.tfds_name}) is not prepared in {root} and --download was not "
                f"given: {spec.how_to_get}"
            ) from None
    version_dir = pathlib.Path(str(make_builder(root).data_dir))
    existed = _is_prepared(version_dir)
    if existed and not force:
        return version_dir, "found"
    if version_dir.exists() and not (existed or force):  # not ours to replace unasked
        raise FileExistsError(f"{version_dir} exists but is not a prepared dataset (no dataset_info.json): "
                              "delete it, or pass --force to replace it")
    _build_and_install(make_builder, root, version_dir, manual)
    return version_dir, "replaced" if existed else "prepared"


def prepare(
    name: str, data_dir: str | None = None, manual_dir: str | None = None, download: bool = False,
    force: bool = False,
) -> pathlib.Path:
    """Prepares registry dataset ``name`` under ``data_dir``; returns ``<data_dir>/<tfds_name>/<version>``.

    A dataset already prepared is left untouched unless ``force``. ``download`` is needed only for TFDS's own
    builders (without it they raise :class:`registry.DataNotFoundError` at once).
    """
    return _prepare(name, data_dir, manual_dir, download, force)[0]


def convert(name: str, data_dir: str | None = None) -> tuple[pathlib.Path, bool]:
    """Adds array_record files to a dataset prepared as TFRecord; (version dir, whether it converted now).

    Both formats hold the same serialized examples, so each shard is copied record by record (to a temporary name,
    renamed when complete) and ``array_record`` is listed in dataset_info.json as an alternative format.
    """
    spec = registry.get_dataset_spec(name)
    version_dir = registry.prepared_dir(spec, data_dir)
    if "array_record" in registry.prepared_file_formats(version_dir):
        return version_dir, False
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError(
            f"{version_dir} is TFRecord and converting it needs TensorFlow: pip install tensorflow-cpu"
        ) from None
    from array_record.python import array_record_module

    shards = sorted(version_dir.glob("*.tfrecord-*"))
    if not shards:
        raise FileNotFoundError(f"{version_dir} lists TFRecord but holds no *.tfrecord-* shards: re-prepare it")
    for shard in shards:
        target = shard.with_name(shard.name.replace(".tfrecord-", ".array_record-"))
        partial = target.with_name(target.name + ".incomplete")
        writer = array_record_module.ArrayRecordWriter(str(partial), "group_size:1")
        for record in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator():
            writer.write(record)
        writer.close()
        partial.rename(target)
    info_path = version_dir / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["alternativeFileFormats"] = sorted({*info.get("alternativeFileFormats", []), "array_record"})
    partial = info_path.with_name(info_path.name + ".incomplete")
    partial.write_text(json.dumps(info, indent=2))
    partial.rename(info_path)
    return version_dir, True


def split_sizes(version_dir: pathlib.Path) -> dict[str, int]:
    """{split: number of examples} of a prepared dataset."""
    import tensorflow_datasets as tfds

    info = tfds.builder_from_directory(str(version_dir)).info
    return {split: info.splits[split].num_examples for split in info.splits}


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit code."""
    parser = cli.OneLineParser(prog="python -m vpns_jax.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(sorted(registry.DATASETS))}")
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None, help="folder holding manually downloaded source files")
    parser.add_argument("--download", action="store_true", help="allow TFDS's own builders to download")
    parser.add_argument("--convert", action="store_true",
                        help="add array_record files to a dataset prepared as TFRecord (needs tensorflow)")
    parser.add_argument("--force", action="store_true",
                        help="prepare again even if already prepared; the old copy is replaced once the new one "
                             "is complete")
    parser.add_argument("--verbose", action="store_true", help="tracebacks and progress bars")
    args = parser.parse_args(argv)
    try:
        if not (args.verbose or sys.stderr.isatty()):
            import tensorflow_datasets as tfds

            tfds.disable_progress_bar()
        if args.convert:
            if args.force:
                raise ValueError("--force prepares again and --convert converts in place: give one of them")
            version_dir, converted = convert(args.dataset, args.data_dir)
            done = "prepared" if converted else "found"
        else:
            version_dir, done = _prepare(args.dataset, args.data_dir, args.manual_dir, args.download, args.force)
        sizes = ", ".join(f"{split}: {n}" for split, n in sorted(split_sizes(version_dir).items()))
    except Exception as error:  # noqa: BLE001 - the CLI reports any failure as one line
        return cli.report_error(error, verbose=args.verbose, prefix=f"{parser.prog}: error")
    what = {"prepared": "prepared", "replaced": "prepared again, the previous copy replaced:",
            "found": "already prepared, nothing done:"}[done]
    hint = "; --force prepares it again" if done == "found" and not args.convert else ""
    print(f"{args.dataset}: {what} {version_dir} ({sizes}){hint}")
    problem = registry.class_count_problem(registry.get_dataset_spec(args.dataset), version_dir)
    if problem:  # prepared as asked, but runs will refuse it (run_data checks the same): say so now
        print(f"{parser.prog}: warning: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
