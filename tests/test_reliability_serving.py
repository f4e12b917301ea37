"""Serving reliability: no request kills the server, image sizes are capped, exports are readable.

Truth checked against: a separate process that imports TensorFlow alone (not keras_vit nor
pipelines) and runs the signatures the way TensorFlow Serving does, through a session fed by the
SignatureDef's tensor names (C++ `Session::Run`, which skips the Python shape checks of
`signatures[...]`). Before the in-graph checks, a rank-2 `images` tensor made that process die
of SIGABRT (`Check failed` in tensor_format.h, reached from oneDNN's Conv2D; Eigen's Conv2D,
which TensorFlow runs on CPUs without AVX-512 VNNI/BF16/AMX, refuses it instead, naming no
input). Every bad request must fail with INVALID_ARGUMENT naming the input, and the same
session must then answer a good request exactly as before. Oversized images are forged by patching the dimensions in the header of a
small encoded image, so nothing of their claimed size is ever allocated.
"""

import json
import os
import stat
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from keras_vit import serving
from keras_vit.serving import export as export_module
from keras_vit.serving import inputs as inputs_module
from serving_helpers import encode_image as _encode, tiny_classifier

IMAGE_SIZE = 16  # patch 4, grid 4
MAX_PIXELS = export_module.DEFAULT_MAX_IMAGE_PIXELS

# Runs in a fresh interpreter that cannot import our packages. Feeds each request through a
# session callable on the SignatureDef's tensor names, as TF Serving's predict does, answers it
# with the error or the probabilities, and after each request checks a good one.
_TF_ONLY_SERVER = r"""
import json, sys
sys.modules["keras_vit"] = None
sys.modules["pipelines"] = None
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2

saved_model_dir, requests_path, answers_path = sys.argv[1:]
requests = np.load(requests_path, allow_pickle=True)
graph = tf.Graph()
session = tf.compat.v1.Session(graph=graph)
with graph.as_default():
    meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], saved_model_dir)
runners = {}
for name in ("serving_default", "predict_pixels"):
    signature = meta_graph.signature_def[name]
    (input_info,) = signature.inputs.values()
    # A callable from CallableOptions runs C++ Session::RunCallable on the tensor names, as TF
    # Serving's Session::Run does; session.run and make_callable check the feed's shape in
    # Python first, which TF Serving never does.
    options = config_pb2.CallableOptions(
        feed=[input_info.name], fetch=[signature.outputs["probabilities"].name])
    runners[name] = session._make_callable_from_options(options)


def answer(signature, value):
    try:
        return {"probabilities": runners[signature](value)[0].tolist()}
    except tf.errors.InvalidArgumentError as error:
        return {"error": error.message, "code": "INVALID_ARGUMENT"}


def max_rss_mb():
    # VmHWM, this process's own peak: ru_maxrss would include the parent's peak before exec
    # (Linux keeps it across execve), i.e. the test runner's.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


good = {"predict_pixels": requests["good_pixels"], "serving_default": requests["good_bytes"]}
answers = {"good": {name: answer(name, value) for name, value in good.items()},
           "max_rss_mb_loaded": max_rss_mb()}
for key in sorted(requests.files):
    if key.startswith("good_"):
        continue
    signature, case = key.split(":")
    answers[case] = answer(signature, requests[key])
    answers[case]["max_rss_mb"] = max_rss_mb()
    answers[case]["next_good"] = {name: answer(name, value) for name, value in good.items()}
answers["loaded_our_code"] = [m for m in ("keras_vit", "pipelines") if sys.modules.get(m)]
with open(answers_path, "w") as stream:
    json.dump(answers, stream)
"""


def _small(image_format, seed=0):
    array = np.random.default_rng(seed).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    return _encode(array, image_format)


def _png_claiming(height, width):
    """A 20x28 PNG whose IHDR (bytes 16-24, big-endian) says height x width; CRC left stale."""
    data = bytearray(_small("PNG"))
    data[16:24] = struct.pack(">II", width, height)
    return bytes(data)


def _gif_claiming(height, width):
    data = bytearray(_small("GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _bmp_claiming(height, width):
    data = bytearray(_small("BMP"))
    data[18:26] = struct.pack("<ii", width, -height)  # negative: a top-down bitmap
    return bytes(data)


def _jpeg_segments(data):
    """[(offset, marker)] of a JPEG's header segments up to and including the first SOS."""
    segments, position = [], 2
    while True:
        marker = data[position + 1]
        segments.append((position, marker))
        if marker == 0xDA:
            return segments
        position += 2 + struct.unpack(">H", data[position + 2:position + 4])[0]


def _jpeg_claiming(height, width, keep_scan_data=True):
    """A small JPEG whose frame header (SOF0) says height x width; without `keep_scan_data`
    only its headers and the end-of-image marker remain (about 600 bytes)."""
    data = bytearray(_small("JPEG"))
    segments = _jpeg_segments(bytes(data))
    (sof,) = [offset for offset, marker in segments if marker == 0xC0]
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    if keep_scan_data:
        return bytes(data)
    sos = segments[-1][0]
    scan_header_end = sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]
    return bytes(data[:scan_header_end]) + b"\xff\xd9"


def _flat_png(height, width):
    """A gray height x width RGB PNG, built with zlib (PIL would hold the pixels 3 times)."""
    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    row = b"\0" + b"\x80" * (3 * width)  # filter type 0, then the row's pixels
    compressor = zlib.compressobj(1)
    compressed = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", compressed) + chunk(b"IEND", b""))


def _strings(*items):
    array = np.empty(len(items), object)
    array[:] = items
    return array


def _bad_requests():
    """{"signature:case": value} of the malformed requests, each a numpy array to feed."""
    pixels = np.full((1, IMAGE_SIZE, IMAGE_SIZE, 3), 100.0, np.float32)
    nan, inf = pixels.copy(), pixels.copy()
    nan[0, 3, 4, 1] = np.nan
    inf[0, 5, 6, 2] = np.inf
    side = int(MAX_PIXELS ** 0.5) + 1  # side x side is just beyond the cap
    scalar = np.empty((), object)
    scalar[()] = _small("PNG")
    return {
        "predict_pixels:rank_2": np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32),
        "predict_pixels:rank_3": np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32),
        "predict_pixels:rank_5": np.zeros((1, 1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32),
        "predict_pixels:one_channel": np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32),
        "predict_pixels:four_channels": np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 4), np.float32),
        "predict_pixels:size_17": np.zeros((1, 17, 17, 3), np.float32),
        "predict_pixels:int32": np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.int32),
        "predict_pixels:nan": nan,
        "predict_pixels:inf": inf,
        "serving_default:bytes_rank_2": _strings(_small("PNG")).reshape(1, 1),
        "serving_default:bytes_rank_0": scalar,
        "serving_default:png_23000": _strings(_small("PNG"), _png_claiming(23000, 23000)),
        "serving_default:png_just_beyond_cap": _strings(_png_claiming(side, side)),
        "serving_default:jpeg_13000_no_scan": _strings(_jpeg_claiming(13000, 13000, False)),
        "serving_default:jpeg_beyond_cap": _strings(_jpeg_claiming(side, side)),
        "serving_default:gif_65535": _strings(_gif_claiming(65535, 65535)),
        "serving_default:bmp_beyond_cap": _strings(_bmp_claiming(side, side)),
        "serving_default:jpeg_4000_no_scan": _strings(_jpeg_claiming(4000, 4000, False)),
        "serving_default:jpeg_20x28_no_scan": _strings(_jpeg_claiming(20, 28, False)),
    }


# (case, words the INVALID_ARGUMENT message must contain: the input it names and the reason)
_EXPECTED = [
    ("rank_2", ["input `images`", "(batch, 16, 16, 3)", "got shape] [16 16]"]),
    ("rank_3", ["input `images`", "got shape] [16 16 3]"]),
    ("rank_5", ["input `images`", "got shape] [1 1 16 16 3]"]),
    ("one_channel", ["input `images`", "got shape] [1 16 16 1]"]),
    ("four_channels", ["input `images`", "got shape] [1 16 16 4]"]),
    ("size_17", ["input `images`", "got shape] [1 17 17 3]"]),
    # TensorFlow itself refuses a feed of another dtype, naming the signature's input.
    ("int32", ["predict_pixels_images", "int32", "float"]),
    ("nan", ["input `images`", "NaN or Inf", "NaN values"]),
    ("inf", ["input `images`", "NaN or Inf", "Inf values"]),
    ("bytes_rank_2", ["input `image_bytes`", "string vector", "got shape] [1 1]"]),
    ("bytes_rank_0", ["input `image_bytes`", "got shape] []"]),
    ("png_23000", ["image too large", "23000 x 23000", "image_bytes[1]"]),
    ("png_just_beyond_cap", ["image too large", "image_bytes[0]", "--max_image_pixels"]),
    ("jpeg_13000_no_scan", ["image too large", "13000 x 13000", "image_bytes[0]"]),
    ("jpeg_beyond_cap", ["image too large", "image_bytes[0]"]),
    ("gif_65535", ["image too large", "65535 x 65535", "image_bytes[0]"]),
    ("bmp_beyond_cap", ["image too large", "image_bytes[0]"]),
    ("jpeg_4000_no_scan", ["JPEG without image data", "4000 x 4000", "image_bytes[0]"]),
    ("jpeg_20x28_no_scan", ["JPEG without image data", "20 x 28", "image_bytes[0]"]),
]


def _serve(saved_model_dir, requests, tmp_path):
    """Answers of the TF-only process to `requests` (see _TF_ONLY_SERVER)."""
    requests_path, answers_path = str(tmp_path / "requests.npz"), str(tmp_path / "answers.json")
    np.savez(requests_path, **requests)
    result = subprocess.run(
        [sys.executable, "-c", _TF_ONLY_SERVER, saved_model_dir, requests_path, answers_path],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]  # -6 was SIGABRT
    with open(answers_path) as stream:
        answers = json.load(stream)
    assert answers["loaded_our_code"] == []
    return answers


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("npz"))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """The tiny model exported under umask 022 (the default cap of 40 megapixels)."""
    previous = os.umask(0o022)
    try:
        return serving.export_classifier(model, str(tmp_path_factory.mktemp("exports")), top_k=2)
    finally:
        os.umask(previous)


def _good_requests():
    rng = np.random.default_rng(4)
    return {"good_pixels": rng.uniform(0, 255, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
            "good_bytes": _strings(_small("PNG", 1), _small("JPEG", 2), _small("GIF", 3),
                                   _small("BMP", 4))}


@pytest.mark.slow
def test_every_bad_request_is_refused_and_the_next_good_one_answered(exported, tmp_path):
    answers = _serve(exported.path, {**_good_requests(), **_bad_requests()}, tmp_path)
    good = answers["good"]
    for name in ("predict_pixels", "serving_default"):
        assert "probabilities" in good[name], good[name]
    assert np.array(good["serving_default"]["probabilities"]).shape == (4, 5)
    assert {case for case, _ in _EXPECTED} == {
        key.split(":")[1] for key in _bad_requests()}
    for case, words in _EXPECTED:
        answer = answers[case]
        assert answer.get("code") == "INVALID_ARGUMENT", (case, answer)
        for word in words:
            assert word in answer["error"], (case, word, answer["error"][:600])
        # The same session keeps serving, with the same answers as before the bad request.
        for name in ("predict_pixels", "serving_default"):
            np.testing.assert_array_equal(
                answer["next_good"][name]["probabilities"], good[name]["probabilities"])
    # No refused image was allocated: 23000^2 RGB alone would be 1.5 GB.
    assert max(answers[case]["max_rss_mb"] for case, _ in _EXPECTED) < 1500


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["1", "0"], ids=["onednn", "eigen"])
def test_without_the_checks_a_rank_2_request_reaches_the_kernel(model, tmp_path, monkeypatch,
                                                                  onednn):
    """The harness reaches the kernels as TF Serving does: unchecked, a rank-2 request gets to
    Conv2D, whose oneDNN kernel aborts the process and whose Eigen kernel refuses it naming no
    input. `TF_ENABLE_ONEDNN_OPTS` picks the kernels on any x86 CPU (unset, TensorFlow picks
    oneDNN only on CPUs with AVX-512 VNNI, BF16 or AMX)."""
    monkeypatch.setattr(inputs_module, "checked_pixels", lambda images, *sizes: images)
    unchecked = serving.export_classifier(model, str(tmp_path / "unchecked"), top_k=2)
    requests_path = str(tmp_path / "requests.npz")
    np.savez(requests_path, **_good_requests(),
             **{"predict_pixels:rank_2": np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)})
    answers_path = tmp_path / "answers.json"
    result = subprocess.run(
        [sys.executable, "-c", "import resource; resource.setrlimit(resource.RLIMIT_CORE, "
         "(0, 0))\n" + _TF_ONLY_SERVER, unchecked.path, requests_path, str(answers_path)],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": "", "TF_ENABLE_ONEDNN_OPTS": onednn})
    if onednn == "1":
        assert result.returncode == -6, result.stderr[-3000:]  # SIGABRT
        assert "Check failed" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-3000:]
    error = json.loads(answers_path.read_text())["rank_2"]["error"]
    assert "convolution input must be 4-dimensional" in error, error[:600]
    assert "images" not in error, error[:600]  # the checks name the input; the kernel does not


@pytest.mark.slow
def test_largest_accepted_image_decodes_and_its_peak_memory(exported, tmp_path):
    """An image at the cap is served (its header is not refused); the peak RSS is measured.

    docs/serving.md states the measured numbers.
    """
    side = int(MAX_PIXELS ** 0.5)  # 6324^2 = 39,992,976 <= 40,000,000
    requests = {**_good_requests(), "serving_default:png_at_cap": _strings(_flat_png(side, side))}
    answers = _serve(exported.path, requests, tmp_path)
    answer = answers["png_at_cap"]
    assert "probabilities" in answer, answer
    print(f"peak RSS: {answers['max_rss_mb_loaded']:.0f} MB loaded, "
          f"{answer['max_rss_mb']:.0f} MB after a {side}x{side} PNG")
    # Decoded uint8 (120 MB) and its float32 copy for the resize (480 MB) on top of the loaded
    # process; well below the 8.7 GB a 23000^2 PNG took before the cap.
    assert answer["max_rss_mb"] - answers["max_rss_mb_loaded"] < 1500


def test_header_size_reads_each_format_without_decoding():
    import tensorflow as tf
    from pipelines import preprocess

    claims = {
        "png": _png_claiming(23000, 21000),
        "gif": _gif_claiming(40000, 30000),
        "bmp": _bmp_claiming(13000, 12000),
        "jpeg": _jpeg_claiming(13000, 11000, keep_scan_data=False),
    }
    for image_format, data in claims.items():
        size = preprocess.header_size(tf.constant(data)).numpy().tolist()
        assert size == {"png": [23000, 21000], "gif": [40000, 30000], "bmp": [13000, 12000],
                        "jpeg": [13000, 11000]}[image_format], image_format
    for image_format in ("PNG", "JPEG", "GIF", "BMP"):  # real sizes of real files
        assert preprocess.header_size(tf.constant(_small(image_format))).numpy().tolist() == [
            20, 28]


def test_cap_and_scan_data_rule_in_the_shared_preprocessing():
    import tensorflow as tf
    from pipelines import preprocess

    data = tf.constant(_small("JPEG"))
    assert preprocess.preprocess_for_eval(data, 8, max_image_pixels=20 * 28).shape == (8, 8, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)image too large.*20 x 28.*cat.jpg"):
        preprocess.preprocess_for_eval(data, 8, max_image_pixels=20 * 28 - 1, context="cat.jpg")
    # Trailing bytes after the end-of-image marker, as some cameras write, are accepted.
    trailer = tf.constant(_small("JPEG") + b"\0" * 64)
    assert preprocess.decode_for_eval(trailer, max_image_pixels=10**6).shape == (20, 28, 3)
    header_only = tf.constant(_jpeg_claiming(20, 28, keep_scan_data=False))
    with pytest.raises(tf.errors.InvalidArgumentError, match="JPEG without image data"):
        preprocess.decode_for_eval(header_only, max_image_pixels=10**6)
    # Without a cap (the training and eval pipelines) the decode is TensorFlow's, unchanged:
    # libjpeg makes an image of it (mostly gray).
    assert preprocess.decode_for_eval(header_only).shape == (20, 28, 3)
    with pytest.raises(preprocess.UserError, match="max_image_pixels must be a positive"):
        preprocess.preprocess_for_eval(data, 8, max_image_pixels=0)


def test_export_is_readable_under_the_users_umask(exported):
    """umask 022: directories 0755, files 0644, as a TF Serving of another user needs to read.

    `tempfile.mkdtemp`, where the export is written, makes 0700 directories.
    """
    modes = {}
    for root, dirs, files in os.walk(exported.path):
        for name in dirs + files:
            path = os.path.join(root, name)
            modes[os.path.relpath(path, exported.path)] = stat.S_IMODE(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(exported.path).st_mode) == 0o755
    assert modes["variables"] == 0o755 and modes["saved_model.pb"] == 0o644
    for relative, mode in modes.items():
        is_dir = os.path.isdir(os.path.join(exported.path, relative))
        assert mode == (0o755 if is_dir else 0o644), (relative, oct(mode))
    assert exported.max_image_pixels == MAX_PIXELS


def test_stale_temporary_exports_are_removed_by_the_next_export(model, tmp_path):
    export_dir = tmp_path / "vit"
    export_dir.mkdir()
    # A killed export of this host: its process (a child that has exited) no longer runs.
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    host = export_module._host_tag()
    dead = export_dir / f".tmp-export-{host}-{child.stdout.strip()}-abc123"
    (dead / "variables").mkdir(parents=True)
    # An export running now (this process) and one of another host, recently written: kept.
    running = export_dir / f".tmp-export-{host}-{os.getpid()}-def456"
    running.mkdir()
    other_host = export_dir / ".tmp-export-otherhost-1-ghi789"
    other_host.mkdir()
    # Untouched for over an hour: stale whoever wrote it (here an older exporter's name).
    old = export_dir / ".tmp-export-x8y9z0"
    (old / "variables").mkdir(parents=True)
    hours_ago = time.time() - 2 * export_module.STALE_EXPORT_SECONDS
    for path in (old / "variables", old):
        os.utime(path, (hours_ago, hours_ago))

    exported = serving.export_classifier(model, str(export_dir), top_k=2)
    assert sorted(os.listdir(export_dir)) == sorted(["1", running.name, other_host.name])
    assert exported.version == 1


@pytest.mark.slow
def test_tool_flag_sets_the_cap(model, tmp_path):
    import tensorflow as tf

    model.save(tmp_path / "model.keras")
    export_dir = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, "tools/export.py", f"--checkpoint={tmp_path / 'model.keras'}",
         f"--export_dir={export_dir}", "--max_image_pixels=500"],
        capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["max_image_pixels"] == 500
    serve = tf.saved_model.load(summary["export_path"]).signatures[serving.SERVING_SIGNATURE]
    small = np.random.default_rng(0).integers(0, 256, (20, 25, 3), dtype=np.uint8)  # 500 pixels
    assert serve(image_bytes=tf.constant([_encode(small, "PNG")]))["probabilities"].shape == (1, 5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="image too large"):
        serve(image_bytes=tf.constant([_small("PNG")]))  # 20 x 28 = 560 pixels


def test_bad_max_image_pixels_is_refused(model, tmp_path):
    with pytest.raises(serving.ExportError, match="max_image_pixels must be a positive integer"):
        serving.export_classifier(model, str(tmp_path), max_image_pixels=0)
    assert os.listdir(tmp_path) == []
