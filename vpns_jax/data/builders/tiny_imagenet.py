"""TFDS builder ``tiny_imagenet``: Tiny-ImageNet-200 from a manual copy, offline.

Label i is the i-th of the SORTED wnids, named by its first readable name in ``words.txt``; splits are ``train``
(100,000) and ``validation`` (the official val set, 10,000; the registry's test split). Every image is decoded while
preparing, so a broken one is a one-line error; RGB JPEGs keep their bytes, greyscale ones become RGB PNGs. Where
the copy is looked for and which files are read: docs/data.md, "Datasets".
"""

from __future__ import annotations

import collections
import io
import pathlib
import zipfile
from collections.abc import Iterator

import tensorflow_datasets as tfds
from PIL import Image

from vpns_jax.data.builders.fashion_mnist_local import encode_png

ZIP_NAME = "tiny-imagenet-200.zip"
FOLDER_NAME = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
IMAGE_SIZE = (64, 64)
_FIX = f"download {URL} and pass --manual_dir=FOLDER holding {ZIP_NAME} or its extracted {FOLDER_NAME}/ folder"


class _Source:
    """Read access to a Tiny-ImageNet tree in a folder or a zip, by paths relative to its root."""

    def __init__(self, location: pathlib.Path):
        self.location = location
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        if location.suffix == ".zip":
            try:
                self._zip = zipfile.ZipFile(location)
            except (zipfile.BadZipFile, OSError) as error:
                raise ValueError(f"{location}: not a readable zip ({error}); re-download it") from None
            names = [n for n in self._zip.namelist() if n.rsplit("/", 1)[-1] == "wnids.txt"]
            if not names:
                raise FileNotFoundError(f"{location} holds no wnids.txt: not a Tiny-ImageNet zip; {_FIX}")
            self._prefix = min(names, key=len)[: -len("wnids.txt")]
            self._folders: dict[str, list[str]] = {}  # folder (relative, no trailing /) -> file names in it
            for name in self._zip.namelist():
                if name.startswith(self._prefix) and not name.endswith("/"):
                    folder, _, base = name[len(self._prefix):].rpartition("/")
                    self._folders.setdefault(folder, []).append(base)

    def describe(self, relative: str) -> str:
        """A path for messages."""
        return f"{self.location}:{self._prefix}{relative}" if self._zip else str(self.location / relative)

    def read_bytes(self, relative: str) -> bytes:
        """The bytes of one file; a one-line FileNotFoundError naming it if it is missing."""
        try:
            if self._zip is not None:
                return self._zip.read(self._prefix + relative)
            return (self.location / relative).read_bytes()
        except (KeyError, FileNotFoundError):
            raise FileNotFoundError(f"{self.describe(relative)} is missing: the copy is incomplete; {_FIX}") from None
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise ValueError(f"{self.describe(relative)}: unreadable ({error}); re-download the dataset") from None

    def read_text(self, relative: str) -> str:
        """A text file, decoded as UTF-8."""
        return self.read_bytes(relative).decode("utf-8")

    def list_images(self, relative_dir: str) -> list[str]:
        """Sorted file names of the JPEGs directly in ``relative_dir``."""
        if self._zip is not None:
            names = self._folders.get(relative_dir.rstrip("/"), [])
        else:
            folder = self.location / relative_dir
            names = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        return sorted(n for n in names if n.lower().endswith((".jpeg", ".jpg")))

    def close(self) -> None:
        """Closes the zip, if any."""
        if self._zip is not None:
            self._zip.close()


def find_source(manual_dir: pathlib.Path) -> pathlib.Path:
    """The zip or folder to read in ``manual_dir`` (docs/data.md, "Datasets"); a one-line error otherwise."""
    for candidate in (manual_dir / ZIP_NAME, manual_dir / FOLDER_NAME, manual_dir):
        if candidate.suffix == ".zip" and candidate.is_file():
            return candidate
        if candidate.suffix != ".zip" and (candidate / "wnids.txt").is_file():
            return candidate
    raise FileNotFoundError(f"Tiny-ImageNet not found in {manual_dir} (no {ZIP_NAME}, {FOLDER_NAME}/wnids.txt "
                            f"or wnids.txt): {_FIX}")


def read_wnids(source: _Source) -> list[str]:
    """The wnids of ``wnids.txt``, SORTED (label i is the i-th)."""
    wnids = [line.strip() for line in source.read_text("wnids.txt").splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise ValueError(f"{source.describe('wnids.txt')}: empty or with duplicate wnids; re-download the dataset")
    return sorted(wnids)


def read_class_names(source: _Source, wnids: list[str]) -> list[str]:
    """The first comma-separated name of each of ``wnids`` in ``words.txt`` (``wnid<TAB>name, name, ...``); a name
    two wnids share (ImageNet has two "crane"s) gets its wnid appended, as TFDS label names must be unique."""
    wanted = set(wnids)
    first: dict[str, str] = {}
    for line in source.read_text("words.txt").splitlines():
        wnid, _, names = line.partition("\t")
        if wnid.strip() in wanted:
            first[wnid.strip()] = names.split(",")[0].strip()
    missing = [wnid for wnid in wnids if not first.get(wnid)]
    if missing:
        raise ValueError(f"{source.describe('words.txt')}: no name for {len(missing)} wnid(s) of wnids.txt, "
                         f"e.g. {missing[0]}; re-download the dataset")
    counts = collections.Counter(first[wnid] for wnid in wnids)
    return [first[wnid] if counts[first[wnid]] == 1 else f"{first[wnid]} ({wnid})" for wnid in wnids]


def read_val_annotations(source: _Source, wnids: list[str]) -> dict[str, str]:
    """{val file name: wnid} from ``val/val_annotations.txt``."""
    where = source.describe("val/val_annotations.txt")
    annotations: dict[str, str] = {}
    known = set(wnids)
    for number, line in enumerate(source.read_text("val/val_annotations.txt").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in known:
            raise ValueError(f"{where} line {number}: expected 'file<TAB>wnid<TAB>...' with a wnid of wnids.txt, "
                             f"got {line.strip()!r}")
        annotations[fields[0]] = fields[1]
    if not annotations:
        raise ValueError(f"{where} is empty; re-download the dataset")
    return annotations


def image_for_storage(data: bytes, where: str) -> bytes:
    """The original bytes of a 64x64 RGB image; a lossless RGB PNG of any other mode (grayscale). Decoded in full
    first: ``Image.open`` reads only the header, so a truncated file would otherwise fail only in a run."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # PIL's decoder is the one the reader uses (TFDS decodes with PIL when OpenCV is absent)
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for broken files
        # A val image is also listed in val_annotations.txt, which would then name a missing file.
        delete = "delete it and its line in val/val_annotations.txt" if "val/images/" in where else "delete it"
        raise ValueError(f"{where}: not a readable image ({error}); replace it with an intact copy or {delete}, "
                         "then run the same prepare command again") from None
    with image:
        if image.size != IMAGE_SIZE:
            raise ValueError(f"{where}: image of size {image.size}, expected {IMAGE_SIZE}")
        if image.mode == "RGB":
            return data
        return encode_png(image.convert("RGB"))


def list_train(source: _Source, wnids: list[str]) -> list[tuple[str, int]]:
    """(path relative to the root, label) of every ``train/<wnid>/images/*.JPEG``; every class must have some."""
    items = []
    for label, wnid in enumerate(wnids):
        folder = f"train/{wnid}/images"
        names = source.list_images(folder)
        if not names:
            raise FileNotFoundError(f"no training images in {source.describe(folder)}: the copy is incomplete; {_FIX}")
        items.extend((f"{folder}/{name}", label) for name in names)
    return items


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny-ImageNet-200 (64x64 RGB, 200 classes) from tiny-imagenet-200.zip or its extracted folder."""

    VERSION = tfds.core.Version("1.1.0")
    # 1.0.0 copies have the same labels and image bytes, so runs may keep reading them.
    SUPPORTED_VERSIONS = [tfds.core.Version("1.0.0")]
    RELEASE_NOTES = {
        "1.0.0": "Initial release: train and official val (as 'validation') from a manual copy.",
        "1.1.0": "Readable label names from words.txt (same label order); every image decoded while preparing.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {URL} and put {ZIP_NAME} (or its extracted {FOLDER_NAME}/ folder) in the manual dir "
        "(python -m vpns_jax.data.prepare --dataset=tiny_imagenet --manual_dir=FOLDER)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        """Label names are left open here and set from wnids.txt and words.txt while preparing."""
        return self.dataset_info_from_configs(
            description="Tiny-ImageNet-200: 200 ImageNet classes, 500 train and 50 val 64x64 images each.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(64, 64, 3)),
                "label": tfds.features.ClassLabel(),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="http://cs231n.stanford.edu/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        """Finds the source, reads wnids, names and val annotations (sets the label names) before writing."""
        try:
            manual_dir = pathlib.Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS: the manual dir does not exist or is empty
            raise FileNotFoundError(
                f"Tiny-ImageNet not found: the manual dir {getattr(dl_manager, '_manual_dir', '')} does not exist "
                f"or is empty; {_FIX}"
            ) from None
        location = find_source(manual_dir)
        source = _Source(location)
        try:
            wnids = read_wnids(source)
            names = read_class_names(source, wnids)
            val = read_val_annotations(source, wnids)
            unannotated = sorted(set(source.list_images("val/images")) - set(val))
            if unannotated:
                raise ValueError(f"{source.describe('val/images')}: {len(unannotated)} image(s) without a line in "
                                 f"val/val_annotations.txt, e.g. {unannotated[0]}; re-download the dataset")
            train = list_train(source, wnids)
        finally:
            source.close()
        index = {wnid: i for i, wnid in enumerate(wnids)}
        validation = [(f"val/images/{name}", index[val[name]]) for name in sorted(val)]
        self.info.features["label"].names = names
        return {
            "train": self._generate_examples(location, train),
            "validation": self._generate_examples(location, validation),
        }

    def _generate_examples(
        self, location: pathlib.Path, items: list[tuple[str, int]]
    ) -> Iterator[tuple[str, dict]]:
        """(file name, example) for each (path relative to the root, label) of ``items``."""
        source = _Source(location)
        try:
            for relative, label in items:
                name = relative.rsplit("/", 1)[-1]
                yield name, self._example(source, relative, name, label)
        finally:
            source.close()

    def _example(self, source: _Source, relative: str, name: str, label: int) -> dict:
        """One example: image bytes (see :func:`image_for_storage`), label, file name."""
        image = image_for_storage(source.read_bytes(relative), source.describe(relative))
        return {"image": image, "label": label, "file_name": name}
