"""Published checkpoints by name: the registry, the download cache and the downloads.

    path = keras_vit.pretrained.resolve("augreg_B/16_i21k")   # downloads once, then cached
    keras_vit.pretrained.names()                              # every name of the registry

The registry is one data file, keras_vit/data/pretrained.json: for each name its format
("google_npz", "big_vision" or "timm"), its files (URL and sha256, null where none is
published), the architecture, and the published ImageNet top-1 with where it is published. An
entry may be an alias of another ({"alias_of": NAME}), sharing its files.

The cache mirrors the registry URL, so that an alias and its target share one copy and a file
can be placed by hand:

    $KERAS_VIT_HOME/weights/<host>/<URL path>           the file, complete and checked
    $KERAS_VIT_HOME/weights/<host>/<URL path>.sha256    its sha256 as first downloaded (only
                                                        where the registry publishes none)
    $KERAS_VIT_HOME/weights/<host>/<URL path>.partial   an interrupted download, resumed next
                                                        time (never taken as the file)

`KERAS_VIT_HOME` defaults to ~/.cache/keras_vit. `KERAS_VIT_MIRROR=URL` fetches every file from
that scheme and host instead (a path in it goes before the registry path); the cache location
stays the registry URL's. `KERAS_VIT_OFFLINE=1` never touches the network: a file that is not
in the cache raises `NotCachedError`, saying where to place it.

A download goes to the `.partial` file (resumed with an HTTP Range request; a server that
answers 200 instead of 206 restarts it), its length is checked against Content-Length or
Content-Range and its sha256 against the published one, or else against the one recorded at
the first download; only then is it renamed into place. Every later load re-checks the sha256.
"""

import contextlib
import difflib
import hashlib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

from absl import logging

from keras_vit.files import write_atomically
from keras_vit.variants import POOLINGS
from pipelines.errors import MissingFileError, UserError

#: The registry, a data file of keras_vit.
REGISTRY_PATH = os.path.join(os.path.dirname(__file__), "data", "pretrained.json")
#: What each format means to keras_vit.from_checkpoint: google-research/vision_transformer's
#: .npz, big_vision's .npz, a timm Hub folder (config.json + model.safetensors).
FORMATS = ("google_npz", "big_vision", "timm")
HOME_ENV, MIRROR_ENV, OFFLINE_ENV = "KERAS_VIT_HOME", "KERAS_VIT_MIRROR", "KERAS_VIT_OFFLINE"
DEFAULT_HOME = os.path.join("~", ".cache", "keras_vit")
#: Seconds a connection may stay silent (connect, or between two reads) before it is given up.
TIMEOUT_S = 60
#: Tries per file: an interrupted transfer is resumed this many times before giving up.
ATTEMPTS = 3
_CHUNK_BYTES = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TOP_LEVEL_FIELDS = ("format", "files", "architecture", "imagenet_top1", "top1_source",
                     "description")
_HOW_TO_PREFETCH = "python tools/download.py {name}"


class PretrainedError(UserError):
    """A registry name, a download or a cached file that does not fit; the message says what
    was expected, what was found and what to do."""


class UnknownNameError(PretrainedError):
    """A name the registry does not hold."""


class DownloadError(PretrainedError):
    """A download that failed: an HTTP status, a network failure, a truncated body."""


class IntegrityError(DownloadError):
    """A download or cached file whose length or sha256 is not the expected one."""


class NotCachedError(PretrainedError, MissingFileError):
    """KERAS_VIT_OFFLINE is set and a file of the checkpoint is not in the cache."""


class _Interrupted(Exception):
    """A transfer that stopped early and may be resumed (internal to the retry loop)."""


class _Restart(_Interrupted):
    """A partial file the server cannot resume: the next try starts from byte 0."""


# --- The registry ---------------------------------------------------------------------------

def _read_registry():
    """{name: raw entry} of the registry file (the one place that reads it; tests replace it)."""
    with open(REGISTRY_PATH, encoding="utf-8") as f:
        return json.load(f)["checkpoints"]


def names():
    """Every registry name, sorted."""
    return sorted(_read_registry())


def entry(name):
    """The registry entry of `name` (aliases followed) as a dict with the fields of the file
    plus "name" (and "alias_of" for an alias); checked by `validate_entry`."""
    registry = _read_registry()
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise UnknownNameError(
            f"{name!r} is not a published checkpoint of keras_vit's registry.{hint} "
            "`python tools/download.py --list` (or keras_vit.pretrained.names()) lists them all; "
            "a local file or folder is given by its path instead.")
    found = registry[name]
    if "alias_of" in found:
        target = found["alias_of"]
        if target not in registry or "alias_of" in registry[target]:
            raise PretrainedError(f"Registry {REGISTRY_PATH}: {name!r} is an alias of "
                                  f"{target!r}, which is not a (non-alias) entry of it.")
        found = dict(registry[target], alias_of=target)
    found = dict(found, name=name)
    validate_entry(name, found)
    return found


def validate_entry(name, found):
    """Raises PretrainedError listing every field of a registry entry that is malformed."""
    problems = [f"missing field {field!r}" for field in _TOP_LEVEL_FIELDS if field not in found]
    if found.get("format") not in FORMATS:
        problems.append(f"format {found.get('format')!r} is none of {', '.join(FORMATS)}")
    problems += _file_problems(found.get("files"))
    problems += _architecture_problems(found.get("architecture"))
    top1 = found.get("imagenet_top1")
    if top1 is not None and not (isinstance(top1, (int, float)) and 0 < top1 <= 100):
        problems.append(f"imagenet_top1 {top1!r} is neither null nor a percentage")
    for field in ("top1_source", "description"):
        if not isinstance(found.get(field), str) or not found.get(field):
            problems.append(f"{field} must be a non-empty string")
    if problems:
        raise PretrainedError(f"Registry {REGISTRY_PATH}, entry {name!r}: "
                              + "; ".join(problems) + ".")


def _file_problems(files):
    if not isinstance(files, dict) or not files:
        return ["files must map each file name to {'url': ..., 'sha256': ...}"]
    problems, folders = [], set()
    for filename, spec in files.items():
        url = spec.get("url", "") if isinstance(spec, dict) else ""
        parts = urllib.parse.urlsplit(url)
        segments = parts.path.split("/")
        if parts.scheme != "https" or not parts.hostname:
            problems.append(f"{filename}: url {url!r} is not an https URL")
        elif segments[-1] != filename or ".." in segments or parts.query or parts.fragment:
            problems.append(f"{filename}: url {url!r} must end in /{filename} "
                            "(no '..', query or fragment)")
        sha256 = spec.get("sha256") if isinstance(spec, dict) else None
        if sha256 is not None and not (isinstance(sha256, str) and _SHA256.match(sha256)):
            problems.append(f"{filename}: sha256 {sha256!r} is neither null nor 64 lowercase "
                            "hex digits")
        folders.add((parts.hostname, parts.path.rsplit("/", 1)[0]))
    if len(folders) > 1:
        problems.append("the files' URLs must share one folder (they are cached in one folder)")
    return problems


def _architecture_problems(architecture):
    if not isinstance(architecture, dict):
        return ["architecture must be a mapping"]
    problems = []
    if not re.match(r"^(Ti|S|B|L|H|g)/\d+$", str(architecture.get("variant"))):
        problems.append(f"architecture.variant {architecture.get('variant')!r} is not SIZE/PATCH")
    for field, smallest in (("image_size", 1), ("num_classes", 0)):
        value = architecture.get(field)
        if not isinstance(value, int) or value < smallest:
            problems.append(f"architecture.{field} {value!r} is not an integer >= {smallest}")
    if architecture.get("pooling") not in POOLINGS:
        problems.append(f"architecture.pooling {architecture.get('pooling')!r} is none of "
                        f"{', '.join(POOLINGS)}")
    return problems


# --- Where files live and come from ---------------------------------------------------------

def cache_directory():
    """$KERAS_VIT_HOME/weights (default ~/.cache/keras_vit/weights), not created here."""
    home = os.environ.get(HOME_ENV) or DEFAULT_HOME
    return os.path.join(os.path.expanduser(home), "weights")


def cached_path(url):
    """Where the cache keeps the file of registry URL `url`: <cache>/<host>/<URL path>."""
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(parts.path).lstrip("/")
    return os.path.join(cache_directory(), parts.hostname, *path.split("/"))


def download_url(url):
    """`url` with its scheme and host replaced by $KERAS_VIT_MIRROR's (a mirror path goes
    before the URL's path); `url` itself when KERAS_VIT_MIRROR is not set."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PretrainedError(f"{MIRROR_ENV}={mirror!r} is not an http(s) URL such as "
                              "https://mirror.example.org; set it to your mirror's address "
                              "or unset it.")
    path = parts.path.rstrip("/") + urllib.parse.urlsplit(url).path
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def offline():
    """Whether KERAS_VIT_OFFLINE forbids the network ("1", "true", "yes" or "on")."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# --- Resolving a name -----------------------------------------------------------------------

def resolve(name, *, progress=True):
    """The local path of checkpoint `name`: the file of a one-file entry, the folder of a
    multi-file one (a timm Hub folder). Downloads what the cache lacks (`progress`: a progress
    bar on stderr) and re-checks the sha256 of what it has."""
    found = entry(name)
    paths = {filename: cached_path(spec["url"]) for filename, spec in found["files"].items()}
    missing = [filename for filename, path in paths.items() if not os.path.isfile(path)]
    if missing and offline():
        raise NotCachedError(_offline_message(name, found, missing, paths))
    for filename, spec in found["files"].items():
        if filename in missing:
            _download(spec["url"], paths[filename], spec.get("sha256"), progress)
        else:
            _check_cached(paths[filename], spec.get("sha256"), name)
    first = next(iter(paths.values()))
    return first if len(paths) == 1 else os.path.dirname(first)


def _offline_message(name, found, missing, paths):
    places = "".join(f"\n  {filename}: place it at {paths[filename]}\n"
                     f"    (from {found['files'][filename]['url']})" for filename in missing)
    return (f"{name}: {OFFLINE_ENV} is set and {len(missing)} file(s) of this checkpoint are not "
            f"in the cache {cache_directory()}:{places}\nOn a machine with internet, run "
            f"`{_HOW_TO_PREFETCH.format(name=name)}` (or keras-vit-download) and copy that "
            f"machine's $KERAS_VIT_HOME/weights (default ~/.cache/keras_vit/weights) to "
            f"{cache_directory()} here, or fetch the URL(s) yourself; or unset {OFFLINE_ENV} "
            "to download them now.")


def _check_cached(path, published, name):
    """Re-checks a cached file against the published sha256, else the recorded one (recording
    it at first sight, e.g. for a file placed by hand)."""
    expected, origin = _expected_sha256(path, published)
    found = _sha256_of(path)
    if expected is None:
        _record_sha256(path, found)
    elif found != expected:
        record = f" and {path}.sha256" if origin == "recorded" else ""
        raise IntegrityError(
            f"Cached file {path} has sha256 {found}, but {expected} is {origin} for it: it "
            f"changed or is corrupt since. Delete it{record}, then run "
            f"`{_HOW_TO_PREFETCH.format(name=name)}` to download it afresh.")


def _expected_sha256(path, published):
    """(sha256, "published" | "recorded") or (None, None) when neither exists."""
    if published:
        return published, "published"
    with contextlib.suppress(FileNotFoundError):
        with open(path + ".sha256", encoding="utf-8") as f:
            recorded = f.read().split()
        if recorded and _SHA256.match(recorded[0]):
            return recorded[0], "recorded"
    return None, None


def _record_sha256(path, sha256):
    """Writes `path`.sha256 in sha256sum's format (`sha256sum -c` checks it), atomically."""
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(f"{sha256}  {os.path.basename(path)}\n")

    write_atomically(path + ".sha256", write)


def _sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- Downloading one file -------------------------------------------------------------------

def _download(url, path, published, progress):
    """Fetches registry URL `url` into `path` through `path`.partial, checked, then renamed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(path + ".lock"):
        if os.path.isfile(path):  # another process finished it while this one waited
            return
        source, partial = download_url(url), path + ".partial"
        logging.info("Downloading %s to %s", source, path)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                _transfer(source, partial, progress)
                break
            except _Interrupted as error:
                if isinstance(error, _Restart):
                    os.remove(partial)
                kept = os.path.getsize(partial) if os.path.exists(partial) else 0
                if attempt == ATTEMPTS:
                    raise DownloadError(
                        f"{source}: {error}, {ATTEMPTS} times. {kept} bytes are kept in "
                        f"{partial} (never taken as the file); run again to resume, or check "
                        f"the network (or {MIRROR_ENV}).") from None
                logging.warning("%s: %s; resuming from byte %d (try %d of %d).",
                                source, error, kept, attempt + 1, ATTEMPTS)
        _accept(source, path, partial, published)


def _accept(source, path, partial, published):
    """Checks the complete `partial` against the expected sha256 and renames it to `path`."""
    expected, origin = _expected_sha256(path, published)
    found = _sha256_of(partial)
    if expected is not None and found != expected:
        os.remove(partial)  # whole but wrong: resuming it could never give the right file
        hint = (f"If the publisher replaced the file on purpose, delete {path}.sha256 and run "
                "again." if origin == "recorded" else
                f"Check that {MIRROR_ENV}, if set, serves the same file, and run again.")
        raise IntegrityError(f"{source}: the download has sha256 {found}, but {expected} is "
                             f"{origin} for it; nothing was kept. {hint}")
    if expected is None:
        _record_sha256(path, found)
    os.replace(partial, path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial + ".validator")


def _transfer(source, partial, progress):
    """One HTTP request appending to (206) or rewriting (200) `partial`; returns when the body
    is complete; raises _Interrupted when it may be resumed, DownloadError when not."""
    offset = os.path.getsize(partial) if os.path.exists(partial) else 0
    with _open(source, partial, offset) as response:
        start, total = _body_range(source, response, offset)
        if start == 0:
            _write_validator(partial, response.headers)
        label = os.path.basename(partial)[:-len(".partial")]
        with open(partial, "ab" if start else "wb") as f, \
                _progress_bar(label, total, start, progress) as bar:
            try:
                for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:
                raise _Interrupted(f"the connection broke ({error})") from None
    _check_length(source, partial, total)


def _open(source, partial, offset):
    """The HTTP response for `source` from byte `offset` of `partial`."""
    headers = {"User-Agent": "keras-vit", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = _read_validator(partial)
        if validator:
            headers["If-Range"] = validator  # changed on the server since: a 200, a restart
    request = urllib.request.Request(source, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:  # the partial file is no prefix of the file: restart
            raise _Restart(f"HTTP 416 {error.reason} for bytes {offset}-") from None
        if error.code in (416, 429) or error.code >= 500:
            raise _Interrupted(f"HTTP {error.code} {error.reason}") from None
        raise DownloadError(f"{source}: HTTP {error.code} {error.reason}. "
                            f"{_status_hint(error.code)}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise _Interrupted(f"no answer ({getattr(error, 'reason', error)})") from None


def _status_hint(status):
    if status in (404, 410):
        return (f"The file is not at this URL: it moved upstream, or {MIRROR_ENV}'s mirror "
                "does not hold it (it must serve the registry URL's path). Place the file in the "
                "cache by hand (KERAS_VIT_OFFLINE=1 says where) or report the dead URL.")
    if status in (401, 403):
        return (f"The server refused access: check {MIRROR_ENV}, a proxy or its credentials, "
                "or fetch the file by hand (KERAS_VIT_OFFLINE=1 says where to place it).")
    return "Check the URL, the network and any proxy, then run again."


def _body_range(source, response, offset):
    """(first byte of the body, total length or None) of a 200 or 206 response."""
    if response.status == 200:
        length = response.headers.get("Content-Length")
        return 0, int(length) if length and length.isdigit() else None
    if response.status == 206:
        match = re.match(r"^bytes (\d+)-(\d+)/(\d+|\*)$",
                         response.headers.get("Content-Range", "").strip())
        if match and int(match.group(1)) == offset:
            return offset, None if match.group(3) == "*" else int(match.group(3))
        raise _Restart(f"the server resumed with Content-Range "
                           f"{response.headers.get('Content-Range')!r}, not at byte {offset}")
    raise DownloadError(f"{source}: unexpected HTTP {response.status} {response.reason} "
                        "(200 or 206 expected). Check the URL or the mirror.")


def _check_length(source, partial, total):
    """Refuses a body shorter (resumable) or longer (not) than the announced length."""
    size = os.path.getsize(partial)
    if total is None or size == total:
        return
    if size < total:
        raise _Interrupted(f"the body ended after {size} of {total} bytes")
    os.remove(partial)
    raise IntegrityError(f"{source}: {size} bytes were received but the server announced "
                         f"{total}; nothing was kept. Run again; if it persists, the server "
                         "or mirror is serving a broken response.")


def _read_validator(partial):
    """The ETag or Last-Modified the partial file's bytes came with, or None."""
    with contextlib.suppress(FileNotFoundError):
        with open(partial + ".validator", encoding="utf-8") as f:
            return f.read().strip() or None
    return None


def _write_validator(partial, headers):
    """Keeps a strong ETag (else Last-Modified) for If-Range when resuming `partial`."""
    etag = headers.get("ETag", "")
    validator = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")
    if validator:
        with open(partial + ".validator", "w", encoding="utf-8") as f:
            f.write(validator)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial + ".validator")


@contextlib.contextmanager
def _progress_bar(filename, total, initial, enabled):
    """A tqdm bar on stderr (bytes), or a no-op when disabled or tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if not enabled or tqdm is None:
        yield _NoBar()
        return
    interactive = sys.stderr.isatty()
    with tqdm(total=total, initial=initial, desc=filename, unit="B", unit_scale=True,
              unit_divisor=1024, file=sys.stderr, dynamic_ncols=interactive,
              mininterval=0.2 if interactive else 10.0) as bar:
        yield bar


class _NoBar:
    def update(self, _):
        pass


@contextlib.contextmanager
def _locked(lock_path):
    """Holds an exclusive lock on `lock_path`, so that two processes sharing a cache do not
    write one partial file at once (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
