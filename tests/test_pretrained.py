"""keras_vit.pretrained and tools/download.py: the registry, the cache and the downloads.

No test touches the internet: a loopback HTTP server (127.0.0.1, in this process) serves the
files, with Range support and the failure modes of a real connection, and KERAS_VIT_MIRROR
points every registry URL at it. The truth a download is checked against is the bytes the
server was given; "nothing usable is left" is checked by a resolve in offline mode, which must
still raise.
"""

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import urllib.parse

import pytest

from keras_vit import pretrained
from pipelines.errors import MissingFileError, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_URL = "https://weights.example.org/models/v1/tiny.npz"
TEST_PATH = urllib.parse.urlsplit(TEST_URL).path
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: several reads, a cut in the middle


def _test_entry(sha256=None, files=None):
    return {"format": "google_npz",
            "files": files or {"tiny.npz": {"url": TEST_URL, "sha256": sha256}},
            "architecture": {"variant": "Ti/16", "image_size": 32, "num_classes": 10,
                             "pooling": "token"},
            "imagenet_top1": None, "top1_source": "a test entry", "description": "a test entry"}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` {path: bytes} with Range; `server.modes` {path: mode} breaks it:
    "cut_once" closes the first response halfway, "truncate" always sends half the body it
    announces, "no_range" answers 200 to a Range request, "no_length" sends no Content-Length."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        mode = server.modes.get(self.path)
        start = 0
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if match and mode != "no_range":
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("ETag", '"v1"')
        if mode != "no_length":
            self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Connection", "close")
        self.end_headers()
        sent = body[start:]
        if mode == "truncate" or (mode == "cut_once" and not server.cut):
            server.cut = True
            sent = sent[:len(sent) // 2]
        self.wfile.write(sent)
        self.close_connection = True


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A loopback server behind KERAS_VIT_MIRROR, the cache in tmp_path, the test entry."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.modes, httpd.requests, httpd.cut = {TEST_PATH: PAYLOAD}, {}, [], False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("KERAS_VIT_MIRROR", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setenv("KERAS_VIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERAS_VIT_OFFLINE", raising=False)
    registry = {"test/tiny": _test_entry()}
    monkeypatch.setattr(pretrained, "_read_registry", lambda: registry)
    httpd.registry = registry
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _cached():
    return pretrained.cached_path(TEST_URL)


def _assert_nothing_usable(monkeypatch, name="test/tiny"):
    """No complete file in the cache: an offline resolve still raises."""
    assert not os.path.exists(_cached())
    monkeypatch.setenv("KERAS_VIT_OFFLINE", "1")
    with pytest.raises(pretrained.NotCachedError):
        pretrained.resolve(name, progress=False)
    monkeypatch.delenv("KERAS_VIT_OFFLINE")


# --- The real registry ----------------------------------------------------------------------

def test_every_registry_entry_is_well_formed():
    """Truth: the registry schema (validate_entry) plus what this file's users rely on."""
    names = pretrained.names()
    for name in names:
        found = pretrained.entry(name)  # validates, aliases followed
        assert found["format"] in pretrained.FORMATS
        for filename, spec in found["files"].items():
            assert spec["url"].startswith("https://") and spec["url"].endswith("/" + filename)
            assert spec["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", spec["sha256"])
        if found["format"] == "timm":
            assert set(found["files"]) == {"config.json", "model.safetensors"}
        if found["imagenet_top1"] is not None:
            assert found["top1_source"]
    # The name styles the issue promises.
    for name in ("ViT-B_16_i21k", "ViT-H_14_i21k", "ViT-B_16_i21k_ft_i1k_384", "augreg_B/16_i21k",
                 "augreg_Ti/16_i21k_ft_i1k", "deit_B/16", "deit_B/16_distilled", "dinov2_reg4_B/14",
                 "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"):
        assert name in names


def test_an_alias_shares_its_targets_files():
    alias = pretrained.entry("deit_B/16_distilled")
    target = pretrained.entry("timm/deit_base_distilled_patch16_224.fb_in1k")
    assert alias["alias_of"] == target["name"] and alias["files"] == target["files"]


def test_mirror_rewriting_keeps_the_path(monkeypatch):
    url = pretrained.entry("ViT-B_16_i21k_ft_i1k_384")["files"]["ViT-B_16.npz"]["url"]
    monkeypatch.setenv("KERAS_VIT_MIRROR", "http://mirror.internal:8080/vit/")
    rewritten = pretrained.download_url(url)
    assert rewritten == ("http://mirror.internal:8080/vit" + urllib.parse.urlsplit(url).path)
    monkeypatch.delenv("KERAS_VIT_MIRROR")
    assert pretrained.download_url(url) == url


def test_a_malformed_mirror_is_refused(monkeypatch):
    monkeypatch.setenv("KERAS_VIT_MIRROR", "mirror.internal")
    with pytest.raises(UserError, match="KERAS_VIT_MIRROR"):
        pretrained.download_url(TEST_URL)


def test_cache_directory_follows_keras_vit_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_VIT_HOME", str(tmp_path))
    assert pretrained.cache_directory() == str(tmp_path / "weights")
    monkeypatch.delenv("KERAS_VIT_HOME")
    assert pretrained.cache_directory() == os.path.expanduser("~/.cache/keras_vit/weights")


def test_an_unknown_name_lists_close_matches():
    with pytest.raises(pretrained.UnknownNameError, match="augreg_B/16_i21k") as caught:
        pretrained.entry("augreg_B16_i21k")
    assert isinstance(caught.value, UserError) and "--list" in str(caught.value)


def test_a_malformed_entry_is_reported_with_every_problem(monkeypatch):
    bad = _test_entry(files={"tiny.npz": {"url": "http://x.org/tiny.npz", "sha256": "abc"}})
    bad["format"] = "pickle"
    monkeypatch.setattr(pretrained, "_read_registry", lambda: {"bad": bad})
    with pytest.raises(pretrained.PretrainedError) as caught:
        pretrained.entry("bad")
    for problem in ("format 'pickle'", "not an https URL", "sha256 'abc'"):
        assert problem in str(caught.value)


# --- Downloads through the loopback server ---------------------------------------------------

def test_download_with_progress_then_cached(server, capsys):
    path = pretrained.resolve("test/tiny")
    assert path == _cached() and open(path, "rb").read() == PAYLOAD
    shown = capsys.readouterr().err
    assert "tiny.npz" in shown and "100%" in shown
    recorded = open(path + ".sha256").read().split()[0]
    assert recorded == hashlib.sha256(PAYLOAD).hexdigest()
    # A second resolve reads the cache only, in offline mode too.
    server.requests.clear()
    os.environ["KERAS_VIT_OFFLINE"] = "1"
    try:
        assert pretrained.resolve("test/tiny", progress=False) == path
    finally:
        del os.environ["KERAS_VIT_OFFLINE"]
    assert server.requests == []


def test_a_connection_cut_mid_file_is_resumed(server):
    server.modes[TEST_PATH] = "cut_once"
    path = pretrained.resolve("test/tiny", progress=False)
    assert open(path, "rb").read() == PAYLOAD
    assert server.requests == [(TEST_PATH, None), (TEST_PATH, f"bytes={len(PAYLOAD) // 2}-")]


def test_an_interrupted_download_resumes_in_the_next_run(server, monkeypatch):
    server.modes[TEST_PATH] = "cut_once"
    monkeypatch.setattr(pretrained, "ATTEMPTS", 1)
    with pytest.raises(pretrained.DownloadError, match="run again to resume"):
        pretrained.resolve("test/tiny", progress=False)
    assert os.path.getsize(_cached() + ".partial") == len(PAYLOAD) // 2
    _assert_nothing_usable(monkeypatch)
    assert open(pretrained.resolve("test/tiny", progress=False), "rb").read() == PAYLOAD
    assert server.requests[-1] == (TEST_PATH, f"bytes={len(PAYLOAD) // 2}-")


def test_a_200_answer_to_a_range_request_restarts_cleanly(server, monkeypatch):
    partial = _cached() + ".partial"
    os.makedirs(os.path.dirname(partial))
    with open(partial, "wb") as f:
        f.write(b"stale bytes of another version")
    server.modes[TEST_PATH] = "no_range"
    assert open(pretrained.resolve("test/tiny", progress=False), "rb").read() == PAYLOAD
    assert server.requests[0][1] == f"bytes={len(b'stale bytes of another version')}-"


def test_a_truncated_body_is_refused(server, monkeypatch):
    server.modes[TEST_PATH] = "truncate"
    with pytest.raises(pretrained.DownloadError, match=r"body ended after \d+ of \d+ bytes"):
        pretrained.resolve("test/tiny", progress=False)
    _assert_nothing_usable(monkeypatch)


def test_a_published_sha256_mismatch_is_refused(server, monkeypatch):
    wrong = hashlib.sha256(b"another file").hexdigest()
    server.registry["test/tiny"] = _test_entry(sha256=wrong)
    with pytest.raises(pretrained.IntegrityError) as caught:
        pretrained.resolve("test/tiny", progress=False)
    message = str(caught.value)
    assert wrong in message and hashlib.sha256(PAYLOAD).hexdigest() in message
    assert "published" in message and TEST_PATH in message
    assert not os.path.exists(_cached() + ".partial")
    _assert_nothing_usable(monkeypatch)


def test_a_published_sha256_that_matches_is_accepted(server):
    server.registry["test/tiny"] = _test_entry(sha256=hashlib.sha256(PAYLOAD).hexdigest())
    path = pretrained.resolve("test/tiny", progress=False)
    assert open(path, "rb").read() == PAYLOAD and not os.path.exists(path + ".sha256")


def test_a_recorded_sha256_mismatch_is_refused(server, monkeypatch):
    path = pretrained.resolve("test/tiny", progress=False)
    os.remove(path)  # the user deletes the file; the server now serves other bytes
    server.files[TEST_PATH] = PAYLOAD[::-1]
    with pytest.raises(pretrained.IntegrityError, match="recorded") as caught:
        pretrained.resolve("test/tiny", progress=False)
    assert hashlib.sha256(PAYLOAD).hexdigest() in str(caught.value)
    assert ".sha256" in str(caught.value)
    _assert_nothing_usable(monkeypatch)


def test_a_cached_file_that_changed_is_refused_on_load(server):
    path = pretrained.resolve("test/tiny", progress=False)
    with open(path, "r+b") as f:
        f.write(b"\xff")  # the first byte was 0
    with pytest.raises(pretrained.IntegrityError, match="changed or is corrupt"):
        pretrained.resolve("test/tiny", progress=False)


def test_no_content_length_with_a_published_sha256(server):
    """Without a length to check, the sha256 is what refuses a short body."""
    server.modes[TEST_PATH] = "no_length"
    server.registry["test/tiny"] = _test_entry(sha256=hashlib.sha256(b"x").hexdigest())
    with pytest.raises(pretrained.IntegrityError):
        pretrained.resolve("test/tiny", progress=False)
    assert not os.path.exists(_cached())


def test_http_404_names_the_url_and_the_status(server, monkeypatch):
    del server.files[TEST_PATH]
    with pytest.raises(pretrained.DownloadError) as caught:
        pretrained.resolve("test/tiny", progress=False)
    message = str(caught.value)
    assert pretrained.download_url(TEST_URL) in message and "HTTP 404" in message
    _assert_nothing_usable(monkeypatch)


def test_offline_mode_says_which_file_to_place_where(server, monkeypatch):
    monkeypatch.setenv("KERAS_VIT_OFFLINE", "1")
    with pytest.raises(MissingFileError) as caught:
        pretrained.resolve("test/tiny", progress=False)
    message = str(caught.value)
    for part in ("tiny.npz", _cached(), TEST_URL, "python tools/download.py test/tiny"):
        assert part in message
    assert server.requests == []


def test_a_multi_file_entry_resolves_to_its_folder(server):
    base = "https://huggingface.co/timm/tiny/resolve/main"
    server.registry["test/timm"] = dict(_test_entry(files={
        name: {"url": f"{base}/{name}", "sha256": None}
        for name in ("config.json", "model.safetensors")}), format="timm")
    for name, body in (("config.json", b"{}"), ("model.safetensors", PAYLOAD)):
        server.files[f"/timm/tiny/resolve/main/{name}"] = body
    folder = pretrained.resolve("test/timm", progress=False)
    assert sorted(f for f in os.listdir(folder) if not f.endswith((".sha256", ".lock"))) == [
        "config.json", "model.safetensors"]
    assert open(os.path.join(folder, "model.safetensors"), "rb").read() == PAYLOAD


# --- tools/download.py ----------------------------------------------------------------------

def _download_tool(args, env):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "download.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_download_tool_prefetches_a_real_entry_through_the_mirror(server, tmp_path):
    """The real registry entry's paths are served with stand-in bytes: the tool's only job is
    to put them in the cache (the content is the loaders' business)."""
    name = "dinov2_reg4_S/14"
    files = {"config.json": b'{"architecture": "stand-in"}', "model.safetensors": PAYLOAD}
    real = _real_entry(name)
    for filename, spec in real["files"].items():
        server.files[urllib.parse.urlsplit(spec["url"]).path] = files[filename]
    env = dict(os.environ)
    result = _download_tool([name], env)
    assert result.returncode == 0, result.stderr
    folder = result.stdout.strip().splitlines()[-1]
    assert open(os.path.join(folder, "model.safetensors"), "rb").read() == PAYLOAD
    offline = _download_tool([name], dict(env, KERAS_VIT_OFFLINE="1", KERAS_VIT_MIRROR=""))
    assert offline.returncode == 0 and offline.stdout.strip().splitlines()[-1] == folder


def test_download_tool_lists_and_reports_errors(tmp_path):
    env = dict(os.environ, KERAS_VIT_HOME=str(tmp_path), KERAS_VIT_OFFLINE="1")
    listing = _download_tool(["--list"], env)
    assert listing.returncode == 0, listing.stderr
    assert "augreg_B/16_i21k" in listing.stdout and "85.49" in listing.stdout
    missing = _download_tool(["augreg_B/16_i21k"], env)
    assert missing.returncode == 2 and "error:" in missing.stderr
    assert "KERAS_VIT_OFFLINE" in missing.stderr
    unknown = _download_tool(["augreg_B16_i21k"], env)
    assert unknown.returncode == 2 and "augreg_B/16_i21k" in unknown.stderr


def _real_entry(name):
    """The entry of the shipped registry, whatever a test patched in."""
    with open(pretrained.REGISTRY_PATH, encoding="utf-8") as f:
        registry = json.load(f)["checkpoints"]
    found = registry[name]
    return registry[found["alias_of"]] if "alias_of" in found else found


# --- By name, end to end ----------------------------------------------------------------------

def test_from_checkpoint_by_name_downloads_then_loads_offline(server, monkeypatch):
    """A registry name gives the model of its file: the reference's logits."""
    import io

    import numpy as np

    import keras_vit
    from vit_reference import forward, random_checkpoint, relative_error

    arrays = random_checkpoint(4, 32, 2, 4, 64, grid=4)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    server.files[TEST_PATH] = buffer.getvalue()
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    model = keras_vit.from_checkpoint("test/tiny")
    assert relative_error(model.predict(images, verbose=0), forward(arrays, images)) < 1e-5
    monkeypatch.setenv("KERAS_VIT_OFFLINE", "1")
    requests = len(server.requests)
    assert keras_vit.from_checkpoint("test/tiny", num_classes=3).output_shape == (None, 3)
    assert len(server.requests) == requests  # the cache, not the network


def test_readme_lists_the_registry_as_the_tool_prints_it():
    listing = _download_tool(["--list", "--markdown"], dict(os.environ))
    assert listing.returncode == 0, listing.stderr
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert listing.stdout in readme, "README's registry table: python tools/download.py --list --markdown"
    details = _download_tool(["--list", "--markdown", "--details"], dict(os.environ))
    with open(os.path.join(REPO, "docs", "checkpoints.md"), encoding="utf-8") as f:
        assert details.stdout in f.read(), "docs/checkpoints.md: --list --markdown --details"
