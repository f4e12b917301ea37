"""Readers for the dataset formats the converter understands.

Each reader returns an `ImageSource`: a fixed, ordered list of examples whose slice
`[start, stop)` can be read independently (so shards can be written in parallel and
deterministically). Supported kinds (`KIND:PATH`):

* `folder:PATH`   one sub-folder per class (searched recursively), class index = sorted folder
                  names, or the order given by a class-index JSON. JPEG and PNG bytes are stored
                  as-is; other formats (BMP, GIF, ...) are converted to PNG.
* `cifar10:PATH`, `cifar100:PATH`   the python-format (`cifar-10-python.tar.gz`,
                  `cifar-100-python.tar.gz`) or binary-format (`cifar-10-binary.tar.gz`,
                  `cifar-100-binary.tar.gz`) archives, or their extracted folders. CIFAR-100 uses
                  the fine labels.
* `tfds:NAME`     a TFDS dataset already prepared under `tfds_data_dir`; encoded images are
                  copied without decoding.
* `digits:`       scikit-learn's bundled 8x8 digits, scaled to 0..255, upscaled to 32x32 by
                  repeating each pixel 4x4 (nearest neighbour: lossless, no new values),
                  grayscale replicated to RGB. Split: a fixed permutation (seed 0) of the 1797
                  images, the first 1438 (80%) train, the remaining 359 test.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from pipelines import preprocess, safe_pickle
from pipelines.errors import MissingFileError, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DIGITS_TRAIN_FRACTION = 0.8
DIGITS_SIZE = 32
SPLITS = ("train", "test")


class CorruptSourceError(UserError):
    """An input file is truncated, corrupt or not in the expected format."""


class UnsafePickleError(CorruptSourceError, safe_pickle.ForbiddenGlobalError):
    """A CIFAR python file references code beyond numpy's arrays (possibly malicious)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One image ready to be written. `label` is the 0-based class index."""

    image_bytes: bytes
    image_format: str
    label: int
    height: int
    width: int
    filename: str | None = None


@dataclasses.dataclass
class ImageSource:
    """An ordered list of `num_examples` examples; `read(start, stop)` yields `Record`s."""

    source: str
    class_names: list[str]
    num_examples: int
    read: Callable[[int, int], Iterator[Record]]


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 `(h, w, 3)` -> PNG bytes (lossless, deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _array_source(source, images, labels, class_names, filenames=None) -> ImageSource:
    """A source over uint8 `(n, h, w, 3)` pixels, PNG-encoded on read."""
    n, height, width, _ = images.shape

    def read(start, stop):
        for i in range(start, stop):
            yield Record(
                encode_png(images[i]), "png", int(labels[i]), height, width,
                None if filenames is None else filenames[i],
            )

    return ImageSource(source, list(class_names), n, read)


# ----------------------------------------------------------------------------- digits


def digits_source(split: str) -> ImageSource:
    """scikit-learn's 8x8 digits as 32x32 RGB; see the module docstring for the split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    num_train = int(round(DIGITS_TRAIN_FRACTION * len(order)))
    index = order[:num_train] if split == "train" else order[num_train:]
    pixels = np.round(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    scale = DIGITS_SIZE // pixels.shape[1]
    pixels = np.repeat(np.repeat(pixels, scale, axis=1), scale, axis=2)
    rgb = np.repeat(pixels[..., None], 3, axis=-1)
    filenames = [f"digits:{i}" for i in index]
    return _array_source("digits:", rgb, digits.target[index], [str(d) for d in range(10)], filenames)


# ----------------------------------------------------------------------------- folder


def _load_class_index(path: str) -> tuple[dict[str, int], list[str]]:
    """Reads a class index JSON: Keras' `{"0": ["n01440764", "tench"], ...}` or a list of names.

    Returns:
        `(folder name -> class index, class names)`.

    Raises:
        MissingFileError: `path` does not exist.
        UserError: the file is not JSON, the JSON has neither layout, or its indices are not
            0..n-1.
    """
    if not os.path.isfile(path):
        raise MissingFileError(f"Class index file {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not a JSON class index ({error}).") from None
    if isinstance(data, list):
        return {name: i for i, name in enumerate(data)}, list(data)
    if isinstance(data, dict) and all(isinstance(v, list) and len(v) == 2 for v in data.values()):
        items = sorted(((int(k), v) for k, v in data.items()))
        if [k for k, _ in items] != list(range(len(items))):
            raise UserError(f"{path}: class indices must be 0..{len(items) - 1}.")
        return {synset: k for k, (synset, _) in items}, [name for _, (_, name) in items]
    raise UserError(
        f"{path}: expected a list of class names or Keras' imagenet_class_index.json layout "
        '{"0": ["n01440764", "tench"], ...}.'
    )


def _folder_record(path: str, relname: str, label: int) -> Record:
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            fmt = preprocess.sniff_format(data)
            if fmt in ("jpeg", "png"):
                return Record(data, fmt, label, height, width, relname)
            # Converted losslessly; GIFs keep their first frame, as tf.io.decode_image does.
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptSourceError(
            f"{path}: not a readable image ({e}). Remove or replace the file and convert again."
        ) from e
    return Record(encode_png(pixels), "png", label, height, width, relname)


def folder_source(root: str, split: str, class_index: str | None = None) -> ImageSource:
    """Image-folder tree: `root/<class>/**/<image>`; see the module docstring."""
    if not os.path.isdir(root):
        raise MissingFileError(f"folder:{root} is not a directory.")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    stray = sorted(
        e.name for e in os.scandir(root)
        if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if stray:
        raise UserError(
            f"folder:{root} has {len(stray)} images directly in it (e.g. {stray[0]}); expected "
            "one sub-folder per class holding that class's images."
        )
    if not folders:
        raise UserError(f"folder:{root} has no class sub-folders.")
    if class_index:
        mapping, class_names = _load_class_index(class_index)
        unknown = [c for c in folders if c not in mapping]
        if unknown:
            raise UserError(
                f"folder:{root}: class folders {unknown[:5]} are not in the class index "
                f"{class_index} (which has e.g. {list(mapping)[:3]})."
            )
    else:
        mapping, class_names = {c: i for i, c in enumerate(folders)}, folders
    entries = []  # (path, relative name, label)
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    path = os.path.join(dirpath, name)
                    entries.append((path, os.path.relpath(path, root), mapping[folder]))
    if split == "train":
        # Mixed classes within every shard, as Model Garden's ImageNet converter does.
        order = np.random.default_rng(0).permutation(len(entries))
        entries = [entries[i] for i in order]

    def read(start, stop):
        for path, relname, label in entries[start:stop]:
            yield _folder_record(path, relname, label)

    return ImageSource(f"folder:{root}", class_names, len(entries), read)


# ----------------------------------------------------------------------------- CIFAR


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class _Files:
    """Basename -> bytes for the files of an archive (.tar.gz) or a directory tree."""

    def __init__(self, path: str):
        self.path = path
        self._members: dict[str, Callable[[], bytes]] = {}
        if os.path.isdir(path):
            for dirpath, _, filenames in os.walk(path):
                for name in filenames:
                    full = os.path.join(dirpath, name)
                    self._members.setdefault(name, lambda full=full: _read_file(full))
                    self._members[name + "@path"] = lambda full=full: full
        elif os.path.isfile(path):
            try:
                self._tar = tarfile.open(path, "r:*")
                for member in self._tar.getmembers():
                    if member.isfile():
                        name = os.path.basename(member.name)
                        self._members.setdefault(name, lambda m=member: self._extract(m))
                        self._members[name + "@path"] = lambda m=member: f"{path}:{m.name}"
            except (tarfile.TarError, EOFError, OSError) as e:
                raise CorruptSourceError(
                    f"{path}: truncated or corrupt archive ({e}). Download it again."
                ) from e
        else:
            raise MissingFileError(f"{path} does not exist.")

    def _extract(self, member) -> bytes:
        try:
            return self._tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise CorruptSourceError(
                f"{self.path}:{member.name}: truncated or corrupt archive ({e}). Download it again."
            ) from e

    def has(self, name: str) -> bool:
        return name in self._members

    def read(self, name: str) -> bytes:
        return self._members[name]()

    def where(self, name: str) -> str:
        return self._members[name + "@path"]()


_CIFAR_LAYOUTS = {
    # kind -> (python split files, python meta, meta key, label key, binary split files,
    #          binary meta, label bytes per record, label byte used)
    "cifar10": (
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "batches.meta", b"label_names", b"labels",
        {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]},
        "batches.meta.txt", 1, 0,
    ),
    "cifar100": (
        {"train": ["train"], "test": ["test"]},
        "meta", b"fine_label_names", b"fine_labels",
        {"train": ["train.bin"], "test": ["test.bin"]},
        "fine_label_names.txt", 2, 1,
    ),
}
_CIFAR_PIXELS = 32 * 32 * 3


def _unpickle(files: _Files, name: str) -> dict:
    """Unpickles the CIFAR python file `name` of `files` with the restricted unpickler.

    Raises:
        UnsafePickleError: the pickle references code (also a `safe_pickle.ForbiddenGlobalError`).
        CorruptSourceError: the file is truncated or corrupt, or holds no dict.
    """
    where = files.where(name)
    try:
        value = safe_pickle.restricted_loads(files.read(name), source=where)
    except safe_pickle.ForbiddenGlobalError as e:
        raise UnsafePickleError(str(e)) from e
    except CorruptSourceError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a truncated pickle
        raise CorruptSourceError(
            f"{where}: truncated or corrupt CIFAR python file ({type(e).__name__}: {e}). "
            "Download the archive again."
        ) from e
    if not isinstance(value, dict):
        raise CorruptSourceError(f"{where}: expected a pickled dict, found {type(value).__name__}.")
    return value


def _cifar_python(files, kind, split):
    split_files, meta, names_key, label_key, *_ = _CIFAR_LAYOUTS[kind]
    class_names = [n.decode() for n in _unpickle(files, meta)[names_key]]
    images, labels, filenames = [], [], []
    for name in split_files[split]:
        where = files.where(name)
        batch = _unpickle(files, name)
        data, batch_labels = batch.get(b"data"), batch.get(label_key)
        if (
            not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != _CIFAR_PIXELS or batch_labels is None
            or len(batch_labels) != data.shape[0]
        ):
            raise CorruptSourceError(
                f"{where}: expected b'data' uint8 (n, 3072) and {label_key!r} with n entries; found "
                f"data {getattr(data, 'dtype', type(data))} {getattr(data, 'shape', '')} and "
                f"{None if batch_labels is None else len(batch_labels)} labels."
            )
        images.append(data)
        labels.append(np.asarray(batch_labels, np.int64))
        names = batch.get(b"filenames")
        if names is not None and len(names) == data.shape[0]:
            filenames += [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        else:
            filenames += [f"{name}:{i}" for i in range(data.shape[0])]
    return np.concatenate(images), np.concatenate(labels), class_names, filenames


def _cifar_binary(files, kind, split):
    *_, split_files, meta, label_bytes, label_index = _CIFAR_LAYOUTS[kind]
    class_names = [n for n in files.read(meta).decode().split("\n") if n.strip()]
    record = label_bytes + _CIFAR_PIXELS
    images, labels, filenames = [], [], []
    for name in split_files[split]:
        raw = np.frombuffer(files.read(name), np.uint8)
        if raw.size == 0 or raw.size % record:
            raise CorruptSourceError(
                f"{files.where(name)}: truncated or corrupt CIFAR binary file: {raw.size} bytes is not "
                f"a whole number of {record}-byte records. Download the archive again."
            )
        raw = raw.reshape(-1, record)
        images.append(raw[:, label_bytes:])
        labels.append(raw[:, label_index].astype(np.int64))
        filenames += [f"{name}:{i}" for i in range(raw.shape[0])]
    return np.concatenate(images), np.concatenate(labels), class_names, filenames


def cifar_source(kind: str, path: str, split: str) -> ImageSource:
    """CIFAR-10/100 from a python- or binary-format archive or folder; see the module docstring."""
    files = _Files(path)
    layout = _CIFAR_LAYOUTS[kind]
    if files.has(layout[1]):
        images, labels, class_names, filenames = _cifar_python(files, kind, split)
    elif files.has(layout[5]):
        images, labels, class_names, filenames = _cifar_binary(files, kind, split)
    else:
        raise MissingFileError(
            f"{kind}:{path}: found neither '{layout[1]}' (python format) nor '{layout[5]}' (binary "
            f"format). Expected cifar-{kind[5:]}-python.tar.gz, cifar-{kind[5:]}-binary.tar.gz or "
            "their extracted folder."
        )
    bad = (labels < 0) | (labels >= len(class_names))
    if bad.any():
        raise CorruptSourceError(
            f"{kind}:{path}: {int(bad.sum())} labels outside [0, {len(class_names)}), e.g. "
            f"{int(labels[bad][0])}; the files are corrupt."
        )
    # Rows are 1024 R, 1024 G, 1024 B values, each a row-major 32x32 plane.
    pixels = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _array_source(f"{kind}:{path}", pixels, labels, class_names, filenames)


# ----------------------------------------------------------------------------- TFDS


def tfds_source(name: str, split: str, data_dir: str | None) -> ImageSource:
    """A prepared TFDS dataset; the encoded image bytes are copied, never re-encoded."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    if split not in builder.info.splits:
        raise UserError(f"tfds:{name} has splits {sorted(builder.info.splits)}, not '{split}'.")
    num_examples = int(builder.info.splits[split].num_examples)
    class_names = list(builder.info.features[label_key].names)

    def read(start, stop):
        ds = builder.as_dataset(
            split=f"{split}[{start}:{stop}]",
            shuffle_files=False,
            decoders={image_key: tfds.decode.SkipDecoding()},
        )
        for i, example in enumerate(tfds.as_numpy(ds)):
            data = example[image_key]
            fmt = preprocess.sniff_format(data)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if fmt not in ("jpeg", "png"):
                    data, fmt = encode_png(np.asarray(image.convert("RGB"))), "png"
            yield Record(data, fmt, int(example[label_key]), height, width, f"{name}/{split}:{start + i}")

    return ImageSource(f"tfds:{name}", class_names, num_examples, read)


def open_source(
    source: str, split: str, *, tfds_data_dir: str | None = None, class_index: str | None = None
) -> ImageSource:
    """Parses `KIND:PATH` and opens it.

    Args:
        source: `folder:PATH`, `cifar10:PATH`, `cifar100:PATH`, `tfds:NAME` or `digits:`.
        split: `"train"` or `"test"` (any split of a TFDS dataset).
        tfds_data_dir: where prepared TFDS datasets live.
        class_index: for `folder:`, see `folder_source`.

    Returns:
        The `ImageSource`.

    Raises:
        UserError: an unknown kind (the message lists the kinds) or split, or a source that is
            not laid out as its kind expects.
        MissingFileError: PATH, or a file its kind needs, does not exist.
        CorruptSourceError: a file is truncated or corrupt (also raised later, while reading).
    """
    kind, sep, path = source.partition(":")
    if not sep:
        raise UserError(f"--source must be KIND:PATH, got {source!r}.")
    if split not in SPLITS and kind != "tfds":
        raise UserError(f"split must be one of {SPLITS}, got {split!r}.")
    if kind == "digits":
        return digits_source(split)
    if kind == "folder":
        return folder_source(path, split, class_index)
    if kind in _CIFAR_LAYOUTS:
        return cifar_source(kind, path, split)
    if kind == "tfds":
        return tfds_source(path, split, tfds_data_dir)
    raise UserError(
        f"Unknown source kind {kind!r} in {source!r}; expected folder:PATH, cifar10:PATH, "
        "cifar100:PATH, tfds:NAME or digits:."
    )
