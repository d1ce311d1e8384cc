"""The datasets vpns_jax knows, by config name: their TFDS builders, splits and how to get them.

Splits follow the authors' code (docs/method.md, section 2.2). Nothing here downloads: a dataset not prepared under
``data_dir`` is a one-line ``DataNotFoundError`` saying where it was looked for and how to provide it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

TFDS_DEFAULT_DATA_DIR = "~/tensorflow_datasets"


class DataNotFoundError(FileNotFoundError):
    """A dataset is not prepared where it was looked for; the message says how to provide it."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its TFDS builder, the splits used for training and testing, and how to get it."""

    name: str
    tfds_name: str
    train_split: str
    test_split: str
    num_classes: int
    batch_size: int  # the authors' default for this dataset
    how_to_get: str


def _tfds_download(name: str) -> str:
    return (
        f"prepare it once with network access: python -m vpns_jax.data.prepare --dataset={name} --download "
        "(needs tensorflow for TFDS's own builders: pip install tensorflow-cpu), or copy an already prepared "
        "TFDS directory into --data_dir"
    )


def _manual(name: str, what: str) -> str:
    return f"put {what} in a folder and run: python -m vpns_jax.data.prepare --dataset={name} --manual_dir=FOLDER"


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("cifar10", "cifar10", "train", "test", 10, 256, _tfds_download("cifar10")),
        DatasetSpec("cifar100", "cifar100", "train", "test", 100, 256, _tfds_download("cifar100")),
        DatasetSpec(
            "tiny_imagenet", "tiny_imagenet", "train", "validation", 200, 256,
            _manual("tiny_imagenet", "tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
                    "or its extracted tiny-imagenet-200/ folder"),
        ),
        DatasetSpec("oxford_iiit_pet", "oxford_iiit_pet", "train", "test", 37, 64, _tfds_download("oxford_iiit_pet")),
        DatasetSpec("dtd", "dtd", "train+validation", "test", 47, 64, _tfds_download("dtd")),
        DatasetSpec("food101", "food101", "train", "validation", 101, 256, _tfds_download("food101")),
        DatasetSpec(
            "oxford_flowers102", "oxford_flowers102", "train+validation", "test", 102, 128,
            _tfds_download("oxford_flowers102"),
        ),
        DatasetSpec(
            "stanford_cars", "cars196", "train", "test", 196, 128,
            "TFDS's cars196 download URL is dead: prepare cars196 from a manual copy of the Stanford Cars "
            "archives (see the TFDS cars196 page), then copy the prepared cars196/ directory into --data_dir",
        ),
        DatasetSpec(
            "fashion_mnist", "fashion_mnist_local", "train", "test", 10, 256,
            "install Debian's package (apt-get install dataset-fashion-mnist, or make data), then run: "
            "python -m vpns_jax.data.prepare --dataset=fashion_mnist "
            "[--manual_dir=FOLDER holding the four IDX .gz files]",
        ),
        DatasetSpec(
            "digits", "sklearn_digits", "train", "test", 10, 64,
            "install scikit-learn (it is in requirements.txt), then run: python -m vpns_jax.data.prepare --dataset=digits",
        ),
    )
}


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec of config name ``name``; a one-line error listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"dataset {name!r} is unknown: use one of {', '.join(sorted(DATASETS))}") from None


def resolve_data_dir(data_dir: str | None) -> pathlib.Path:
    """``data_dir``, else $TFDS_DATA_DIR, else TFDS's default ~/tensorflow_datasets."""
    return pathlib.Path(os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or TFDS_DEFAULT_DATA_DIR))


def prepared_dir(spec: DatasetSpec, data_dir: str | None) -> pathlib.Path:
    """The newest prepared version directory (``<data_dir>/<tfds_name>[/<config>]/<version>``) of ``spec``; only
    the local file system is read, so a missing dataset is reported at once, never after a download attempt."""
    root = resolve_data_dir(data_dir) / spec.tfds_name
    infos = sorted(root.glob("*/dataset_info.json")) + sorted(root.glob("*/*/dataset_info.json"))
    # Only version folders count: TFDS writes into ``incomplete.<id>_<version>`` and renames it when done,
    # so a preparation killed after its dataset_info.json was written must not pass for a finished one.
    infos = [info for info in infos if _version_key(info.parent.name) != (-1,)]
    if not infos:
        raise DataNotFoundError(f"dataset {spec.name!r} is not prepared in {root}: {spec.how_to_get}")
    return max(infos, key=lambda p: _version_key(p.parent.name)).parent


def _version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (-1,)


def prepared_file_formats(version_dir: pathlib.Path) -> list[str]:
    """The file formats a prepared dataset is stored in: its main one, then any converted alternatives."""
    info = json.loads((version_dir / "dataset_info.json").read_text() or "{}")
    return [info.get("fileFormat", "array_record"), *info.get("alternativeFileFormats", [])]


def prepared_num_classes(version_dir: pathlib.Path) -> int | None:
    """The class count of a prepared dataset's ``label`` feature from ``features.json``, else from its label names
    file (TFDS copies without one), else None; no TFDS import."""
    try:
        features = json.loads((version_dir / "features.json").read_text())
        return int(features["featuresDict"]["features"]["label"]["classLabel"]["numClasses"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return sum(1 for line in (version_dir / "label.labels.txt").read_text().splitlines() if line.strip())
    except OSError:
        return None


def class_count_problem(spec: DatasetSpec, version_dir: pathlib.Path) -> str | None:
    """Why the prepared copy ``version_dir`` of ``spec`` does not fit its configs (another class count), or None:
    a copy from an incomplete source would train with missing classes against the wrong head size."""
    found = prepared_num_classes(version_dir)
    if found is None or found == spec.num_classes:
        return None
    return (f"dataset {spec.name!r} in {version_dir} has {found} classes where the config expects "
            f"{spec.num_classes}: prepare it again from a complete copy, adding --force to replace this one "
            f"({spec.how_to_get})")


def check_class_count(spec: DatasetSpec, data_dir: str | None) -> None:
    """A one-line ValueError when the prepared copy of ``spec`` has another class count than ``spec.num_classes``
    (metadata only: cheap)."""
    problem = class_count_problem(spec, prepared_dir(spec, data_dir))
    if problem is not None:
        raise ValueError(problem)
