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
import struct
import tarfile
import zlib
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from pipelines import preprocess, safe_pickle
from pipelines.errors import MissingFileError, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DIGITS_TRAIN_FRACTION = 0.8
DIGITS_SIZE = 32
SPLITS = ("train", "test")
#: Default `max_image_pixels`: PIL's own decompression-bomb threshold (89,478,485 pixels, about
#: 9459 x 9459). A `folder:` or `tfds:` image with more pixels (from its header, before any
#: decoding) is refused with `ImageTooLargeError`.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
#: The most bytes one file of a CIFAR archive or folder may hold (the largest real one, CIFAR-100's
#: python `train`, is 155 MB). A larger member, e.g. of a decompression bomb, is refused from its
#: size in the archive's header, before it is decompressed.
MAX_MEMBER_BYTES = 256 << 20


class CorruptSourceError(UserError):
    """An input file is truncated, corrupt or not in the expected format."""


class ImageTooLargeError(UserError):
    """An image has more pixels than `max_image_pixels` allows."""


def shown(path: str) -> str:
    """`path` for a message: as it is, or its `repr` when it is not valid UTF-8 (undecodable
    bytes of a file name become surrogate escapes, which cannot be printed)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return ascii(path)
    return path


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


def _check_pixels(width, height, where, max_image_pixels) -> None:
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise ImageTooLargeError(
            f"{where}: {width} x {height} = {width * height:,} pixels is more than "
            f"max_image_pixels={max_image_pixels:,}. Downscale the image, remove it, or convert "
            "with a larger --max_image_pixels."
        )


def _decoded_image_info(data: bytes, where: str, max_image_pixels) -> tuple[int, int, str | None,
                                                                             np.ndarray | None]:
    """Decodes `data` fully, so a truncated or corrupt image is refused here, not in training.

    (PIL's `verify()` does not notice a truncated file; `load()` does.)

    Returns:
        `(width, height, "jpeg"/"png" or None, RGB pixels when the format is another one)`.

    Raises:
        ImageTooLargeError: more pixels than `max_image_pixels` (from the header, not decoded).
        CorruptSourceError: not a readable image, or truncated; names `where`.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            _check_pixels(width, height, where, max_image_pixels)
            image.load()
            fmt = preprocess.sniff_format(data)
            if fmt in ("jpeg", "png"):
                return width, height, fmt, None
            # Converted losslessly; GIFs keep their first frame, as tf.io.decode_image does.
            return width, height, None, np.asarray(image.convert("RGB"))
    except UserError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(
            f"{where}: {e} Downscale the image or remove it and convert again.") from e
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as e:
        raise CorruptSourceError(
            f"{where}: not a readable image, or truncated ({type(e).__name__}: {e}). Remove or "
            "replace the file and convert again."
        ) from e


def _folder_record(path: str, relname: str, label: int, max_image_pixels) -> Record:
    with open(path, "rb") as f:
        data = f.read()
    width, height, fmt, pixels = _decoded_image_info(data, shown(path), max_image_pixels)
    if pixels is None:
        return Record(data, fmt, label, height, width, relname)
    return Record(encode_png(pixels), "png", label, height, width, relname)


def _class_folders(root: str) -> list[str]:
    """The sorted class folder names of `root`.

    Raises:
        UserError: a class folder's name is not valid UTF-8 (class names are stored as text).
    """
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    for name in folders:
        if shown(name) != name:
            raise UserError(
                f"folder:{root}: the class folder name {ascii(name)} is not valid UTF-8; class "
                "names are stored as text. Rename the folder."
            )
    return folders


def folder_source(root: str, split: str, class_index: str | None = None,
                  max_image_pixels: int | None = MAX_IMAGE_PIXELS) -> ImageSource:
    """Image-folder tree: `root/<class>/**/<image>`; see the module docstring.

    Every image is decoded fully when read (truncated files are refused); one with more than
    `max_image_pixels` pixels is refused. File names that are not valid UTF-8 are stored with
    their original bytes (`image/filename`).
    """
    if not os.path.isdir(root):
        raise MissingFileError(f"folder:{root} is not a directory.")
    folders = _class_folders(root)
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
            yield _folder_record(path, relname, label, max_image_pixels)

    return ImageSource(f"folder:{root}", class_names, len(entries), read)


# ----------------------------------------------------------------------------- CIFAR


def _too_large(where: str, size: int) -> CorruptSourceError:
    return CorruptSourceError(
        f"{where}: {size:,} bytes (decompressed) is more than the {MAX_MEMBER_BYTES:,} a CIFAR "
        "file can hold; this is not a CIFAR archive (possibly a decompression bomb)."
    )


def _read_file(path: str) -> bytes:
    size = os.path.getsize(path)
    if size > MAX_MEMBER_BYTES:
        raise _too_large(path, size)
    with open(path, "rb") as f:
        return f.read()


def _not_a_file(where: str, member: tarfile.TarInfo) -> Callable[[], bytes]:
    """A reader for an archive member that is a link or a special file: it raises, naming it."""
    what = f"a link to {member.linkname!r}" if member.issym() or member.islnk() else "not a file"

    def read():
        raise CorruptSourceError(
            f"{where} is {what}, not a regular file; the CIFAR archives hold regular files only. "
            "Use the official archive (or extract it and convert the folder)."
        )

    return read


class _Files:
    """Basename -> bytes for the files of an archive (.tar.gz) or a directory tree.

    Reads are bounded: a file or member over `MAX_MEMBER_BYTES` is refused from its size, so a
    decompression bomb fails with bounded memory.
    """

    def __init__(self, path: str):
        self.path = path
        self._members: dict[str, Callable[[], bytes]] = {}
        self._where: dict[str, str] = {}
        self._regular: dict[str, bool] = {}
        if os.path.isdir(path):
            for dirpath, _, filenames in os.walk(path):
                for name in filenames:
                    full = os.path.join(dirpath, name)
                    self._add(name, full, lambda full=full: _read_file(full))
        elif os.path.isfile(path):
            self._list_archive(path)
        else:
            raise MissingFileError(f"{path} does not exist.")

    def _add(self, name, where, read, regular=True) -> None:
        """Registers `name`; the first regular file of that basename wins over links."""
        if name in self._members and (not regular or self._regular[name]):
            return
        self._members[name], self._where[name], self._regular[name] = read, where, regular

    def _list_archive(self, path) -> None:
        try:
            self._tar = tarfile.open(path, "r:*")
            for member in self._tar:  # streams: a member's data is skipped, never held
                name, where = os.path.basename(member.name), f"{path}:{member.name}"
                if not member.isfile():
                    if not member.isdir():
                        self._add(name, where, _not_a_file(where, member), regular=False)
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    raise _too_large(where, member.size)
                self._add(name, where, lambda m=member: self._extract(m))
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise CorruptSourceError(
                f"{path}: truncated or corrupt archive ({e}). Download it again."
            ) from e

    def _extract(self, member) -> bytes:
        try:
            data = self._tar.extractfile(member).read(MAX_MEMBER_BYTES + 1)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise CorruptSourceError(
                f"{self.path}:{member.name}: truncated or corrupt archive ({e}). Download it again."
            ) from e
        if len(data) > MAX_MEMBER_BYTES:
            raise _too_large(f"{self.path}:{member.name}", len(data))
        return data

    def has(self, name: str) -> bool:
        return name in self._members

    def read(self, name: str) -> bytes:
        if name not in self._members:
            raise MissingFileError(f"{self.path} has no file named {name!r}; expected a CIFAR "
                                   "archive or its extracted folder.")
        return self._members[name]()

    def where(self, name: str) -> str:
        return self._where.get(name, f"{self.path}:{name}")


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


def tfds_source(name: str, split: str, data_dir: str | None,
                max_image_pixels: int | None = MAX_IMAGE_PIXELS) -> ImageSource:
    """A prepared TFDS dataset; the encoded image bytes are copied, never re-encoded.

    Each image is decoded once to check it (as for `folder:`).
    """
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
            data, where = example[image_key], f"tfds:{name}/{split}:{start + i}"
            width, height, fmt, pixels = _decoded_image_info(data, where, max_image_pixels)
            if pixels is not None:
                data, fmt = encode_png(pixels), "png"
            yield Record(data, fmt, int(example[label_key]), height, width, f"{name}/{split}:{start + i}")

    return ImageSource(f"tfds:{name}", class_names, num_examples, read)


def open_source(
    source: str, split: str, *, tfds_data_dir: str | None = None, class_index: str | None = None,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> ImageSource:
    """Parses `KIND:PATH` and opens it.

    Args:
        source: `folder:PATH`, `cifar10:PATH`, `cifar100:PATH`, `tfds:NAME` or `digits:`.
        split: `"train"` or `"test"` (any split of a TFDS dataset).
        tfds_data_dir: where prepared TFDS datasets live.
        class_index: for `folder:`, see `folder_source`.
        max_image_pixels: for `folder:` and `tfds:`, refuse images with more pixels (None: no
            limit of ours; PIL still refuses over 2 x `Image.MAX_IMAGE_PIXELS`).

    Returns:
        The `ImageSource`.

    Raises:
        UserError: an unknown kind (the message lists the kinds) or split, or a source that is
            not laid out as its kind expects.
        MissingFileError: PATH, or a file its kind needs, does not exist.
        CorruptSourceError: a file is truncated or corrupt, or an archive member is a link or
            too large (also raised later, while reading).
        ImageTooLargeError: (while reading) an image over `max_image_pixels`.
    """
    kind, sep, path = source.partition(":")
    if not sep:
        raise UserError(f"--source must be KIND:PATH, got {source!r}.")
    if split not in SPLITS and kind != "tfds":
        raise UserError(f"split must be one of {SPLITS}, got {split!r}.")
    if kind == "digits":
        return digits_source(split)
    if kind == "folder":
        return folder_source(path, split, class_index, max_image_pixels)
    if kind in _CIFAR_LAYOUTS:
        return cifar_source(kind, path, split)
    if kind == "tfds":
        return tfds_source(path, split, tfds_data_dir, max_image_pixels)
    raise UserError(
        f"Unknown source kind {kind!r} in {source!r}; expected folder:PATH, cifar10:PATH, "
        "cifar100:PATH, tfds:NAME or digits:."
    )
