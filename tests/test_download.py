"""Published core files: manifests, mirrors and downloads against a misbehaving loopback HTTP server."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpsdata import MPSDataError
from mpsdata._archive import CoreFile, iterate_batches, settings_key, write_core_file
from mpsdata.download import (
    MIRROR_ENV,
    fetch,
    fetch_published,
    find_published,
    list_published,
    load_manifest,
    local_name,
    pack,
    register_commands,
)

FAST = {"timeout": 2.0, "retries": 1, "backoff": 0.01, "progress": False}


def _settings(dataset: str = "MPSFake", split: str = "train", ratio: float = 0.5) -> dict:
    return {"dataset": dataset, "split": split, "image_shape": [1, 8, 8], "ratio": ratio, "core_dtype": "float16"}


def _write_core(path: Path, settings: dict, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (24, 8, 8), dtype=np.uint8)
    targets = np.arange(24) % 3
    return write_core_file(
        path,
        iterate_batches(images, targets, 16),
        num_samples=24,
        image_shape=(1, 8, 8),
        image_mode="L",
        options={"ratio": settings["ratio"]},
        core_dtype="float16",
        settings=settings,
        meta={"classes": ["a", "b", "c"]},
        progress=False,
    )


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> tuple[Path, dict, bytes]:
    settings = _settings()
    path = _write_core(tmp_path_factory.mktemp("core") / "train.h5", settings)
    return path, settings, path.read_bytes()


def _entry(data: bytes, settings: dict, name: str = "fake-train.h5", urls: list | None = None) -> dict:
    return {
        "name": name,
        "settings": settings,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "urls": urls or [],
    }


@pytest.fixture
def entry(core) -> dict:
    return _entry(core[2], core[1])


# ---------------------------------------------------------------------------------------------------
# A loopback server whose routes misbehave on purpose: /<mode>/<name>
class _Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.static: Path | None = None
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut_done: set[str] = set()
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # clients the tests make hang up
                    server.route(self)

        class Httpd(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request, client_address) -> None:
                pass

        self.httpd = Httpd(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mode}"

    def hits(self, mode: str) -> list[tuple[str, str | None]]:
        return [r for r in self.requests if r[0].startswith(f"/{mode}/")]

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def data(self, name: str) -> bytes | None:
        if name in self.files:
            return self.files[name]
        if self.static is not None and re.fullmatch(r"[\w.-]+", name) and (self.static / name).is_file():
            return (self.static / name).read_bytes()
        return None

    def route(self, h: BaseHTTPRequestHandler) -> None:
        mode, _, name = h.path.lstrip("/").partition("/")
        if mode == "redirect":
            h.send_response(302)
            h.send_header("Location", f"/redirect2/{name}")
            h.end_headers()
            return
        if mode == "redirect2":
            h.send_response(301)
            h.send_header("Location", f"{self.url('good')}/{name}")
            h.end_headers()
            return
        data = self.data(name)
        if mode == "endless" and data is not None:  # the file, then garbage without end: the client must stop
            h.send_response(200)
            h.end_headers()
            h.wfile.write(data)
            for _ in range(10_000):
                h.wfile.write(b"\xff" * 4096)
            return
        if data is None or mode == "missing":
            h.send_error(404)
            return
        if mode == "slow":
            self.stop.wait(3.0)
        if mode == "corrupt":
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        if mode == "big":  # announces more than the manifest's size
            self.send(h, data, length=len(data) + 10**12)
            return
        if mode in ("cut", "cutnorange") and name not in self.cut_done:
            self.cut_done.add(name)
            self.send(h, data, limit=len(data) // 2)
            return
        throttle = mode == "throttle"
        self.send(h, data, ranges=mode not in ("norange", "cutnorange"), throttle=throttle)

    def send(self, h, data: bytes, ranges=True, limit=None, length=None, throttle=False) -> None:
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if ranges and match:
            start = int(match[1])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        body = data[start:]
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        body = body if limit is None else body[:limit]
        step = 1024 if throttle else len(body)
        for i in range(0, len(body), max(step, 1)):
            h.wfile.write(body[i : i + step])
            h.wfile.flush()
            if throttle:
                time.sleep(0.01)


@pytest.fixture
def server(core, entry):
    s = _Server()
    s.files[entry["name"]] = core[2]
    yield s
    s.close()


def _dead_url() -> str:
    """A loopback port with nothing listening: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone"


def _only_file(folder: Path, name: str) -> None:
    """The folder holds exactly the placed file: no partial, lock or temporary files."""
    assert sorted(p.name for p in folder.iterdir()) == [name]


# ---------------------------------------------------------------------------------------------------
def test_shipped_manifest_has_the_schema():
    document = json.loads(Path(__file__).parents[1].joinpath("mpsdata", "manifest.json").read_text())
    assert document["format"] == "mpsdata-manifest"
    assert document["version"] == 1
    assert isinstance(document["archives"], list)
    assert len(load_manifest()) == len(document["archives"])


def test_fetch_verifies_places_and_caches(server, core, entry, tmp_path):
    path = fetch(entry, tmp_path, mirrors=[server.url("good")], **FAST)
    assert path == tmp_path / f"train-{settings_key(core[1])}.h5"  # the name datasets look for
    assert path.read_bytes() == core[2]
    assert CoreFile(path, expected_settings=core[1]).num_samples == 24
    _only_file(tmp_path, path.name)
    again = fetch(entry, tmp_path, mirrors=[server.url("good")], **FAST)
    assert again == path
    assert len(server.hits("good")) == 1  # the verified copy is reused, not downloaded again


def test_404_moves_to_the_next_mirror(server, entry, tmp_path):
    path = fetch(entry, tmp_path, mirrors=[server.url("missing"), server.url("good")], **FAST)
    assert path.is_file()
    assert len(server.hits("missing")) == 1  # a 404 is not retried
    assert len(server.hits("good")) == 1


def test_corrupted_bytes_keep_nothing(server, entry, tmp_path):
    with pytest.raises(MPSDataError, match="sha256") as info:
        fetch(entry, tmp_path, mirrors=[server.url("corrupt")], **FAST)
    assert server.url("corrupt") in str(info.value)
    assert list(tmp_path.iterdir()) == []
    path = fetch(entry, tmp_path, mirrors=[server.url("corrupt"), server.url("good")], **FAST)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    _only_file(tmp_path, path.name)


@pytest.mark.parametrize("kept", ["whole", "half"])
def test_a_bad_partial_file_from_an_earlier_run_is_fetched_again(server, core, entry, tmp_path, kept):
    """A leftover partial file whose bytes are wrong (a killed run, a disk fault) fails the checksum once, then
    the same mirror is asked again from the first byte instead of being blamed."""
    size = len(core[2]) if kept == "whole" else len(core[2]) // 2
    part = tmp_path / f".{local_name(entry)}.{entry['sha256'][:16]}.part"
    part.write_bytes(b"\0" * size)
    path = fetch(entry, tmp_path, mirrors=[server.url("good")], **FAST)
    assert path.read_bytes() == core[2]
    ranges = [r for _, r in server.hits("good")]
    assert ranges == ([None] if kept == "whole" else [f"bytes={size}-", None])
    _only_file(tmp_path, path.name)


def test_cut_connection_resumes_with_range(server, core, entry, tmp_path):
    path = fetch(entry, tmp_path, mirrors=[server.url("cut")], **FAST)
    assert path.read_bytes() == core[2]
    first, second = server.hits("cut")
    assert first[1] is None
    assert second[1] == f"bytes={len(core[2]) // 2}-"  # resumed where the cut left it
    _only_file(tmp_path, path.name)


def test_failed_download_keeps_its_part_and_a_server_ignoring_range_restarts(server, core, entry, tmp_path):
    with pytest.raises(MPSDataError, match="resumes there"):
        fetch(entry, tmp_path, mirrors=[server.url("cut")], **{**FAST, "retries": 0})
    (part,) = tmp_path.glob(".*.part")
    assert part.stat().st_size == len(core[2]) // 2
    part.write_bytes(b"\0" * part.stat().st_size)  # a wrong prefix: only a restart can still pass the checksum
    path = fetch(entry, tmp_path, mirrors=[server.url("norange")], **FAST)
    assert server.hits("norange")[0][1] == f"bytes={len(core[2]) // 2}-"  # asked to resume, got the whole file
    assert path.read_bytes() == core[2]
    _only_file(tmp_path, path.name)


def test_cut_on_a_server_without_range(server, core, entry, tmp_path):
    path = fetch(entry, tmp_path, mirrors=[server.url("cutnorange")], **FAST)
    assert path.read_bytes() == core[2]
    assert len(server.hits("cutnorange")) == 2


def test_slow_server_times_out_then_next_mirror(server, entry, tmp_path):
    start = time.perf_counter()
    path = fetch(entry, tmp_path, mirrors=[server.url("slow"), server.url("good")], **{**FAST, "timeout": 0.3})
    elapsed = time.perf_counter() - start
    assert path.is_file()
    assert len(server.hits("slow")) == 2  # one attempt and one retry, each cut by the timeout
    assert elapsed < 2.5  # the server would have answered after 3 s per request


def test_redirects_are_followed(server, core, entry, tmp_path):
    path = fetch(entry, tmp_path, mirrors=[server.url("redirect")], **FAST)
    assert path.read_bytes() == core[2]
    assert [len(server.hits(m)) for m in ("redirect", "redirect2", "good")] == [1, 1, 1]


def test_every_mirror_down_lists_what_was_tried(server, entry, tmp_path):
    dead = [_dead_url(), _dead_url()]
    entry = {**entry, "urls": [f"{server.url('missing')}/{entry['name']}"]}
    with pytest.raises(MPSDataError) as info:
        fetch(entry, tmp_path, mirrors=dead, **FAST)
    message = str(info.value)
    for url in [f"{d}/{entry['name']}" for d in dead] + entry["urls"]:
        assert url in message
    assert "download=False" in message and "mpsdata build" in message
    assert MIRROR_ENV in message
    assert list(tmp_path.iterdir()) == []


def test_concurrent_fetches_end_with_one_good_file(server, core, entry, tmp_path):
    results: list = []

    def worker() -> None:
        try:
            results.append(fetch(entry, tmp_path, mirrors=[server.url("throttle")], **FAST))
        except Exception as error:  # surfaced by the assertion below
            results.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 3 and all(isinstance(r, Path) for r in results), results
    assert len({str(r) for r in results}) == 1
    assert results[0].read_bytes() == core[2]
    assert len(server.hits("throttle")) == 1  # the others waited on the lock, then reused the file
    _only_file(tmp_path, results[0].name)


def test_announced_size_above_the_manifest_is_refused(server, entry, tmp_path):
    with pytest.raises(MPSDataError, match="announces"):
        fetch(entry, tmp_path, mirrors=[server.url("big")], **FAST)
    assert list(tmp_path.iterdir()) == []


def test_reading_stops_at_the_manifest_size(server, core, entry, tmp_path):
    start = time.perf_counter()
    path = fetch(entry, tmp_path, mirrors=[server.url("endless")], **FAST)
    assert path.read_bytes() == core[2]  # not one byte of the garbage that follows
    assert time.perf_counter() - start < 5  # the endless body (40 MB) is not read to its end
    _only_file(tmp_path, path.name)


_HOSTILE = [
    ({"name": "../escape.h5"}, "name"),
    ({"name": "sub/dir.h5"}, "name"),
    ({"name": "/etc/passwd"}, "name"),
    ({"name": ".hidden"}, "name"),
    ({"name": "a\\b.h5"}, "name"),
    ({"name": "x" * 300}, "name"),
    ({"size": 0}, "size"),
    ({"size": -5}, "size"),
    ({"size": 2**50}, "size"),
    ({"size": "100"}, "size"),
    ({"size": True}, "size"),
    ({"sha256": "abc"}, "sha256"),
    ({"sha256": "z" * 64}, "sha256"),
    ({"settings": "pickle"}, "settings"),
    ({"settings_key": "000000000000"}, "settings_key"),
    ({"urls": ["ftp://example.org/x.h5"]}, "URL"),
    ({"urls": "http://example.org/x.h5"}, "urls"),
]


@pytest.mark.parametrize(("change", "field"), _HOSTILE)
def test_hostile_entries_are_rejected_before_any_network_access(server, entry, tmp_path, change, field):
    dest = tmp_path / "dest"
    with pytest.raises(MPSDataError, match=field):
        fetch({**entry, **change}, dest, mirrors=[server.url("good")], **FAST)
    assert server.requests == []
    assert not dest.exists() and not (tmp_path / "escape.h5").exists()


def test_hostile_manifests(server, core, entry, tmp_path):
    def write(document) -> Path:
        path = tmp_path / "manifest.json"
        path.write_text(json.dumps(document))
        return path

    good = {"format": "mpsdata-manifest", "version": 1, "archives": [entry]}
    assert load_manifest(write(good))[0]["name"] == entry["name"]
    with pytest.raises(MPSDataError, match="archive 0"):
        load_manifest(write({**good, "archives": [{**entry, "name": "../../x"}]}))
    with pytest.raises(MPSDataError, match="twice"):
        load_manifest(write({**good, "archives": [entry, entry]}))
    with pytest.raises(MPSDataError, match="upgrade"):
        load_manifest(write({**good, "version": 2}))
    with pytest.raises(MPSDataError, match="not an mpsdata manifest"):
        load_manifest(write([entry]))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MPSDataError, match="JSON"):
        load_manifest(tmp_path / "deep.json")
    # A remote manifest may not send us to local files, nor be larger than a manifest can be.
    server.files["manifest.json"] = json.dumps({**good, "archives": [{**entry, "urls": ["file:///etc/x"]}]}).encode()
    with pytest.raises(MPSDataError, match="URL"):
        load_manifest(f"{server.url('good')}/manifest.json")
    with pytest.raises(MPSDataError, match="announces"):
        load_manifest(f"{server.url('big')}/manifest.json")
    server.files["manifest.json"] = json.dumps(good).encode()  # valid, but followed by 40 MB of garbage
    with pytest.raises(MPSDataError, match="more than a manifest"):
        load_manifest(f"{server.url('endless')}/manifest.json")
    # Unreadable manifests are MPSDataError too (the command line prints it without a traceback).
    with pytest.raises(MPSDataError, match="could not be read.*404"):
        load_manifest(f"{server.url('missing')}/manifest.json")
    with pytest.raises(MPSDataError, match="could not be read.*refused"):
        load_manifest(_dead_url() + "/manifest.json")
    with pytest.raises(MPSDataError, match="could not be read.*IsADirectoryError"):
        load_manifest(tmp_path)
    with pytest.raises(MPSDataError, match="could not be read.*FileNotFoundError"):
        load_manifest(tmp_path / "nothing.json")


def _publish(server: _Server, data: bytes, settings: dict, name: str) -> dict:
    server.files[name] = data
    return _entry(data, settings, name=name)


def test_a_hostile_hdf5_file_is_never_placed(server, core, tmp_path):
    huge = tmp_path / "huge.h5"
    with h5py.File(huge, "w") as f:  # tiny on disk, declares a terabyte of targets
        f.attrs["format"] = "mpsdata-cores"
        f.attrs["format_version"] = 1
        f.create_dataset("targets", shape=(2**37,), dtype=np.int64, chunks=(1024,))
    entry = _publish(server, huge.read_bytes(), core[1], "huge.h5")
    dest = tmp_path / "dest"
    with pytest.raises(MPSDataError, match="declares"):
        fetch(entry, dest, mirrors=[server.url("good")], **FAST)
    assert list(dest.iterdir()) == []

    layout = tmp_path / "layout.h5"  # a layout whose index arrays would need 8 TB
    layout.write_bytes(core[0].read_bytes())
    with h5py.File(layout, "r+") as f:
        described = json.loads(f.attrs["layout"])
        f.attrs["layout"] = json.dumps({**described, "padded_height": 10**6, "padded_width": 10**6})
    entry = _publish(server, layout.read_bytes(), core[1], "layout.h5")
    with pytest.raises(MPSDataError, match="layout"):
        fetch(entry, dest, mirrors=[server.url("good")], **FAST)
    assert list(dest.iterdir()) == []

    linked = tmp_path / "linked.h5"
    linked.write_bytes(core[0].read_bytes())
    with h5py.File(linked, "r+") as f:
        f["elsewhere"] = h5py.ExternalLink("/etc/hostname", "/")
    entry = _publish(server, linked.read_bytes(), core[1], "linked.h5")
    with pytest.raises(MPSDataError, match="ExternalLink"):
        fetch(entry, dest, mirrors=[server.url("good")], **FAST)
    assert list(dest.iterdir()) == []

    # A valid core file published under other settings than it holds.
    entry = _publish(server, core[2], _settings(ratio=0.25), "other.h5")
    with pytest.raises(MPSDataError, match="other settings"):
        fetch(entry, dest, mirrors=[server.url("good")], **FAST)
    assert list(dest.iterdir()) == []


def test_file_mirrors(core, entry, tmp_path):
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / entry["name"]).write_bytes(core[2])
    missing = tmp_path / "empty"
    path = fetch(entry, tmp_path / "a", mirrors=[str(missing), folder.as_uri()], **FAST)
    assert path.read_bytes() == core[2]
    path = fetch(entry, tmp_path / "b", mirrors=[folder], **FAST)  # a plain folder works too
    assert path.read_bytes() == core[2]


def test_mirror_environment_variable_is_tried_in_order(server, core, entry, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, f"{server.url('missing')} , {server.url('good')}")
    path = fetch(entry, tmp_path, **FAST)
    assert path.read_bytes() == core[2]
    assert [r[0].split("/")[1] for r in server.requests] == ["missing", "good"]
    # the argument comes before the variable
    fetch(entry, tmp_path / "b", mirrors=[server.url("redirect")], **FAST)
    assert server.requests[2][0].startswith("/redirect/")


def test_no_url_at_all_says_how_to_add_one(entry, tmp_path, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    with pytest.raises(MPSDataError, match=MIRROR_ENV):
        fetch(entry, tmp_path, **FAST)


def test_pack_manifest_download_round_trip(server, core, tmp_path, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    out = tmp_path / "public"
    server.static = out
    base = server.url("good")
    (entry,) = pack([core[0]], out, base_url=base)
    assert entry["urls"] == [f"{base}/{entry['name']}"]
    assert (out / entry["name"]).read_bytes() == core[2]
    assert load_manifest(out / "manifest.json") == [entry]
    assert pack([core[0]], out, base_url=base) == [entry]  # packing again changes nothing
    assert len(load_manifest(out / "manifest.json")) == 1

    found = find_published(core[1], mirrors=[base])  # read from the mirror's own manifest.json
    assert found == entry
    assert find_published(_settings(ratio=0.3), mirrors=[base]) is None
    target = tmp_path / "data" / f"train-{settings_key(core[1])}.h5"
    assert fetch_published(core[1], target, mirrors=[base], progress=False)
    assert CoreFile(target, expected_settings=core[1]).content_sha256 == entry["content_sha256"]
    assert not fetch_published(_settings(ratio=0.3), tmp_path / "x.h5", mirrors=[base], progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_command_line_pack_and_download(server, core, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    parser = argparse.ArgumentParser(prog="mpsdata")
    register_commands(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> int:
        args = parser.parse_args(argv)
        return args.handler(args)

    out = tmp_path / "public"
    server.static = out
    assert run("pack", str(core[0]), "--out", str(out), "--no-verify") == 0
    (name,) = [p.name for p in out.glob("*.h5")]
    assert run("download", "--list", "--mirror", server.url("good")) == 0
    assert name in capsys.readouterr().out
    dest = tmp_path / "cores"
    assert run("download", name[:12], "--archive-dir", str(dest), "--mirror", server.url("good")) == 0
    assert (dest / f"train-{settings_key(core[1])}.h5").read_bytes() == core[2]
    with pytest.raises(ValueError, match="no published core file"):
        run("download", "nothing-like-it", "--archive-dir", str(dest), "--mirror", server.url("good"))


def test_download_root_uses_the_dataset_folder(tmp_path, monkeypatch):
    """``--root`` puts the file where the dataset class named in the settings looks for it."""
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    settings = _settings(dataset="MPSCIFAR10")
    source = _write_core(tmp_path / "cifar.h5", settings)
    out = tmp_path / "public"
    (entry,) = pack([source], out, verify=False)
    parser = argparse.ArgumentParser(prog="mpsdata")
    register_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["download", entry["name"], "--root", str(tmp_path / "root"), "--mirror", str(out)])
    assert args.handler(args) == 0
    assert (tmp_path / "root" / "cifar-10-batches-py" / "mps" / f"train-{entry['settings_key']}.h5").is_file()


def test_unreadable_mirror_manifest_warns_and_finds_nothing(core, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="manifest"):
        assert find_published(core[1], mirrors=[_dead_url()], timeout=1.0) is None


def test_a_mirror_without_manifest_is_a_plain_mirror(server, core, entry, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    assert list_published(mirrors=[server.url("good")]) == load_manifest()  # 404 for its manifest: no warning
    assert find_published(core[1], manifest=[entry]) == {**entry, "settings_key": settings_key(core[1])}


def test_a_hand_written_entry_with_tuples_is_found(core, entry):
    settings = {**entry["settings"], "extra": (1, 8, 8)}
    hand = {**entry, "settings": settings, "settings_key": settings_key(settings)}
    assert find_published(settings, manifest=[hand]) is not None


def test_entries_of_every_readable_format_version_are_found(core, entry, monkeypatch):
    """int8 (version 2) and int4 (version 3) files are published too; only a newer version is skipped."""
    from mpsdata._archive import MAX_FORMAT_VERSION

    monkeypatch.delenv(MIRROR_ENV, raising=False)
    for version in range(1, MAX_FORMAT_VERSION + 1):
        found = find_published(core[1], manifest=[{**entry, "format_version": version}])
        assert found is not None and found["format_version"] == version
    assert find_published(core[1], manifest=[{**entry, "format_version": MAX_FORMAT_VERSION + 1}]) is None


def test_a_dataset_opens_the_fetched_file(tmp_path, monkeypatch):
    """The hook's names agree with the datasets': build, publish, delete, fetch, open without rebuilding."""
    import PIL.Image

    import mpsdata

    monkeypatch.delenv(MIRROR_ENV, raising=False)
    folder = tmp_path / "images"
    rng = np.random.default_rng(1)
    for k, cls in enumerate(("cat", "dog")):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            PIL.Image.fromarray(image).save(folder / cls / f"{k}{i}.png")
    options = {"image_size": 8, "ratio": 0.5, "build_workers": 0, "archive_dir": tmp_path / "built"}
    built = mpsdata.MPSImageFolder(folder, **options)
    expected = np.asarray(built[4][0])
    out = tmp_path / "public"
    pack([built.archive], out, verify=False)
    settings = built._cores.settings
    target = tmp_path / "fetched" / built.archive.name
    assert fetch_published(settings, target, mirrors=[out], progress=False)
    built.archive.unlink()
    opened = mpsdata.MPSImageFolder(folder, **{**options, "archive_dir": target.parent})
    assert opened.archive == target
    assert not built.archive.exists()  # nothing was rebuilt
    assert np.array_equal(np.asarray(opened[4][0]), expected)
