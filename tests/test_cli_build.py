"""The ``mpsdata`` command line: build, info, verify and show, on tiny fakes in the original raw formats.

``mpsdata.cli.main(argv)`` is called in-process and returns the exit status; every error must come out as one
line ``mpsdata <command>: error: ...`` on stderr and status 1, never a traceback. Figures that ``info`` prints
are checked against what the dataset class and the core file report on their own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import PIL.Image
import pytest
import torchvision
from fakes import write_cifar, write_image_folder, write_mnist

import mpsdata
from mpsdata._archive import FORMAT_VERSION, MAX_FORMAT_VERSION, CoreFile
from mpsdata.cli import main

INFO_KEYS = {
    "file",
    "format_version",
    "dataset",
    "split",
    "images",
    "image_shape",
    "classes",
    "layout",
    "domain",
    "colour",
    "bond_dims",
    "terms",
    "core_dtype",
    "ratio",
    "bytes_ratio",
    "file_bytes",
    "psnr_db",
    "settings",
    "source",
    "content_sha256",
}


def _run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _assert_error(status: int, err: str, command: str, *fragments: str) -> None:
    assert status == 1
    assert err.startswith(f"mpsdata {command}: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def _flip_core_bytes(path: Path) -> None:
    with h5py.File(path, "r", locking=False) as f:
        start = f["cores/site_1"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[start + 4] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """``mpsdata build fashion-mnist --split test --raw RAW`` run once: (raw dir, root, core file, stdout)."""
    base = tmp_path_factory.mktemp("cli")
    raw, root = base / "downloads", base / "data"
    write_mnist(raw, num_train=30, num_test=24)
    status = main(["build", "fashion-mnist", "--root", str(root), "--split", "test", "--raw", str(raw)])
    assert status == 0
    files = list((root / "FashionMNIST" / "mps").glob("*.h5"))
    assert len(files) == 1
    ds = mpsdata.MPSFashionMNIST(root, train=False)
    return raw, root, files[0], repr(ds)


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


# -- build ------------------------------------------------------------------------------------------------------------
def test_build_copies_raw_files_and_writes_one_file(built) -> None:
    raw, root, path, _ = built
    copied = sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir())
    assert copied == sorted(p.name for p in raw.iterdir())
    for name in copied:
        assert (root / "FashionMNIST" / "raw" / name).read_bytes() == (raw / name).read_bytes()
    assert path.name.startswith("test-")
    assert mpsdata.MPSFashionMNIST(root, train=False).archive == path


def test_build_prints_the_dataset_and_reuses_its_file(built, capsys: pytest.CaptureFixture) -> None:
    raw, root, path, ds_repr = built
    before = path.stat().st_mtime_ns
    status, out, _ = _run(capsys, "build", "fashion-mnist", "--root", root, "--split", "test", "--raw", raw)
    assert status == 0
    assert ds_repr in out
    psnr = mpsdata.MPSFashionMNIST(root, train=False).psnr
    assert f"PSNR: {psnr:.2f} dB" in out
    assert path.stat().st_mtime_ns == before
    assert list(path.parent.iterdir()) == [path]


def test_build_options_reach_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_mnist(tmp_path / "raw")
    root = tmp_path / "data"
    argv = ["build", "mnist", "--root", root, "--raw", tmp_path / "raw", "--core-dtype", "float32"]
    argv += ["--site-dims", "2,4,7,7,2", "--bond-dims", "2,6,5,2"]
    status, _, _ = _run(capsys, *argv)
    assert status == 0
    (path,) = (root / "MNIST" / "mps").glob("*.h5")
    cores = CoreFile(path)
    assert cores.geometry.bond_dims == (2, 6, 5, 2) and cores.geometry.layout.site_dims == (2, 4, 7, 7, 2)
    assert cores.core_dtype == "float32" and cores.settings["split"] == "train"
    same = mpsdata.MPSMNIST(root, bond_dims=[2, 6, 5, 2], site_dims=[2, 4, 7, 7, 2], core_dtype="float32")
    assert same.archive == path
    status, _, err = _run(capsys, "build", "mnist", "--root", root, "--ratio", "0.25", "--tol", "0.1")
    _assert_error(status, err, "build")
    status, _, _ = _run(capsys, "build", "mnist", "--root", root, "--ratio", "0.25")
    assert status == 0 and len(list((root / "MNIST" / "mps").glob("*.h5"))) == 2


def test_build_with_a_byte_budget(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--bytes-ratio`` stores int8 cores (format version 2) within the budget; ``info`` and ``show`` read the file."""
    write_mnist(tmp_path / "raw")
    root = tmp_path / "data"
    argv = ["build", "mnist", "--root", root, "--raw", tmp_path / "raw", "--bytes-ratio", "0.3", "--compression", "lzf"]
    status, _, err = _run(capsys, *argv)
    assert status == 0, err
    (path,) = (root / "MNIST" / "mps").glob("*.h5")
    cores = CoreFile(path)
    assert cores.core_dtype == "int8" and cores.settings["compression"] == "lzf"
    assert mpsdata.MPSMNIST(root, bytes_ratio=0.3, compression="lzf").archive == path
    status, out, _ = _run(capsys, "info", path, "--json")
    info = json.loads(out)
    assert status == 0 and info["format_version"] == 2 and info["core_dtype"] == "int8"
    status, _, err = _run(capsys, "show", path, "--out", tmp_path / "grid.png", "--root", root)
    assert status == 0, err


def test_build_int4_cores(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--core-dtype int4`` stores int4 cores (format version 3); info, verify and show read the file."""
    write_mnist(tmp_path / "raw")
    root = tmp_path / "data"
    argv = ["build", "mnist", "--root", root, "--raw", tmp_path / "raw", "--bytes-ratio", "0.2", "--core-dtype", "int4"]
    status, _, err = _run(capsys, *argv)
    assert status == 0, err
    (path,) = (root / "MNIST" / "mps").glob("*.h5")
    ds = mpsdata.MPSMNIST(root, bytes_ratio=0.2, core_dtype="int4")
    assert ds.archive == path and ds._cores.core_dtype == "int4"
    status, out, _ = _run(capsys, "info", path, "--json")
    info = json.loads(out)
    assert status == 0 and info["format_version"] == MAX_FORMAT_VERSION == 3 and info["core_dtype"] == "int4"
    assert info["psnr_db"] == pytest.approx(ds.psnr, abs=1e-9) and info["bytes_ratio"] == pytest.approx(ds.bytes_ratio)
    assert info["bond_dims"] == list(ds._cores.geometry.bond_dims)
    status, out, _ = _run(capsys, "info", path)
    assert status == 0 and "core_dtype: int4" in out
    status, out, err = _run(capsys, "verify", path)
    assert status == 0 and out.startswith("OK"), err
    status, _, err = _run(capsys, "show", path, "--out", tmp_path / "grid.png", "--root", root)
    assert status == 0 and (tmp_path / "grid.png").stat().st_size > 0, err


def test_build_cifar10(tmp_path: Path, no_md5: None, capsys: pytest.CaptureFixture) -> None:
    write_cifar(tmp_path)
    status, out, _ = _run(capsys, "build", "cifar10", "--root", tmp_path, "--split", "test")
    assert status == 0 and "Dataset MPSCIFAR10" in out and "Split: Test" in out
    (path,) = (tmp_path / "cifar-10-batches-py" / "mps").glob("test-*.h5")
    assert CoreFile(path).num_samples == 10


def test_build_and_show_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "pets"
    write_image_folder(root, per_class=2)
    status, out, _ = _run(capsys, "build", "imagefolder", "--root", root, "--image-size", "16")
    assert status == 0 and "Image size: 16" in out
    (path,) = (tmp_path / "pets-mps").glob("all-*.h5")
    assert CoreFile(path).settings["image_shape"] == [3, 16, 16]
    status, _, _ = _run(capsys, "show", path, "--out", tmp_path / "grid.png", "--root", root, "--count", "3")
    assert status == 0
    with PIL.Image.open(tmp_path / "grid.png") as img:
        assert img.format == "PNG"


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["mnist", "--split", "val"], "must be train or test"),
        (["cifar10", "--raw", "{raw}"], "--raw applies"),
        (["mnist", "--raw", "{empty}"], "no idx files"),
        (["mnist", "--raw", "{raw}", "--image-size", "16"], "--image-size"),
        (["mnist", "--raw", "{raw}", "--ratio", "0.3", "--max-bond", "3"], ""),
        (["mnist", "--raw", "{raw}", "--ratio", "1.5"], ""),
    ],
    ids=["split", "raw-cifar", "raw-empty", "image-size", "two-budgets", "ratio-range"],
)
def test_build_errors(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], fragment: str) -> None:
    write_mnist(tmp_path / "raw")
    (tmp_path / "empty").mkdir()
    filled = [a.format(raw=tmp_path / "raw", empty=tmp_path / "empty") for a in argv]
    status, _, err = _run(capsys, "build", filled[0], "--root", tmp_path / "data", *filled[1:])
    _assert_error(status, err, "build", fragment)
    assert list(tmp_path.rglob("*.h5")) == []


def test_build_without_raw_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The dataset's RuntimeError is a one-line error with status 1, not a traceback."""
    status, _, err = _run(capsys, "build", "mnist", "--root", tmp_path)
    _assert_error(status, err, "build", "download")


def test_unwritable_root_is_an_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_mnist(tmp_path / "raw")
    blocker = tmp_path / "data"
    blocker.write_text("a file where the root's folders would go")
    status, _, err = _run(capsys, "build", "mnist", "--root", blocker, "--raw", tmp_path / "raw")
    _assert_error(status, err, "build", "Error")  # FileExistsError / NotADirectoryError, named


def test_build_download_reaches_imagefolder(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """--download asks for a published file for imagefolder and imagenet too (it was dropped for them)."""
    from mpsdata.datasets import _base

    asked = []
    monkeypatch.setattr(_base, "fetch_published", lambda settings, *args: asked.append(settings) or False)
    root = tmp_path / "pets"
    write_image_folder(root, per_class=1)
    status, _, _ = _run(capsys, "build", "imagefolder", "--root", root, "--image-size", "8", "--download")
    assert status == 0 and len(asked) == 1 and asked[0]["dataset"] == "MPSImageFolder"


def test_show_count_must_be_positive(built, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for count in ("0", "-5", "x"):
        with pytest.raises(SystemExit) as info:
            main(["show", str(built[2]), "--out", str(tmp_path / "g.png"), "--count", count])
        assert info.value.code == 2
        assert "--count" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["build", "svhn", "--root", "x"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture) -> None:
    status, out, _ = _run(capsys)
    assert status == 0 and "build" in out and "verify" in out


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"mpsdata {mpsdata.__version__}"


# -- info ------------------------------------------------------------------------------------------------------------
def test_info_json_fields(built, capsys: pytest.CaptureFixture) -> None:
    raw, root, path, _ = built
    status, out, _ = _run(capsys, "info", path, "--json")
    assert status == 0
    info = json.loads(out)
    assert set(info) == INFO_KEYS
    ds = mpsdata.MPSFashionMNIST(root, train=False)
    cores = CoreFile(path)
    assert info["file"] == str(path) and info["format_version"] == FORMAT_VERSION
    assert (info["dataset"], info["split"], info["images"]) == ("MPSFashionMNIST", "test", 24)
    assert info["image_shape"] == [1, 28, 28] and info["classes"] == len(ds.classes) == 10
    assert info["layout"] == cores.geometry.layout.describe()
    assert info["bond_dims"] == list(cores.geometry.bond_dims) and info["terms"] == 1
    assert info["core_dtype"] == "float16"
    assert info["ratio"] == pytest.approx(ds.ratio, rel=1e-12)
    assert info["bytes_ratio"] == pytest.approx(ds.bytes_ratio, rel=1e-12)
    assert info["psnr_db"] == pytest.approx(ds.psnr, rel=1e-12)
    assert info["file_bytes"] == path.stat().st_size
    assert info["settings"] == cores.settings and info["settings"]["ratio"] == 0.4
    assert info["content_sha256"] == cores.content_sha256
    source = info["source"]
    assert source["dataset"] == "FashionMNIST" and source["split"] == "test"
    expected = {
        name: hashlib.sha256((raw / name).read_bytes()).hexdigest()
        for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    }
    assert source["files"] == expected


def test_info_text(built, capsys: pytest.CaptureFixture) -> None:
    _, root, path, _ = built
    status, out, _ = _run(capsys, "info", path)
    assert status == 0
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}
    ds = mpsdata.MPSFashionMNIST(root, train=False)
    assert fields["dataset"] == "MPSFashionMNIST" and fields["images"] == "24" and fields["split"] == "test"
    assert fields["ratio"].startswith(f"{ds.ratio:.4f}") and fields["psnr"].startswith(f"{ds.psnr:.2f} dB")
    assert fields["content"] == f"sha256 {CoreFile(path).content_sha256}"


def test_info_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, _, err = _run(capsys, "info", tmp_path / "absent.h5")
    _assert_error(status, err, "info", str(tmp_path / "absent.h5"))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    status, _, err = _run(capsys, "info", tmp_path / "junk.h5", "--json")
    _assert_error(status, err, "info", str(tmp_path / "junk.h5"))


# -- verify ----------------------------------------------------------------------------------------------------------
def test_verify_ok(built, capsys: pytest.CaptureFixture) -> None:
    path = built[2]
    status, out, _ = _run(capsys, "verify", path)
    assert status == 0
    assert out.startswith("OK: 24 images decoded") and str(path) in out


def test_verify_fails_on_a_corrupted_file(built, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    damaged = Path(shutil.copy(built[2], tmp_path / "damaged.h5"))
    _flip_core_bytes(damaged)
    status, out, err = _run(capsys, "verify", damaged)
    _assert_error(status, err, "verify", str(damaged), "checksum")
    assert "OK" not in out


def test_verify_fails_on_a_truncated_file(built, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cut = tmp_path / "cut.h5"
    cut.write_bytes(built[2].read_bytes()[:-512])
    status, _, err = _run(capsys, "verify", cut)
    _assert_error(status, err, "verify", str(cut), "truncated")


def test_verify_fails_on_a_newer_format(built, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    newer = Path(shutil.copy(built[2], tmp_path / "newer.h5"))
    with h5py.File(newer, "r+", locking=False) as f:
        f.attrs["format_version"] = MAX_FORMAT_VERSION + 1
    status, _, err = _run(capsys, "verify", newer)
    _assert_error(status, err, "verify", str(newer), "upgrade")


@pytest.mark.slow  # a fresh interpreter imports torch and mpsdata (~10 s here)
def test_module_entry_point_exit_status(built, tmp_path: Path) -> None:
    damaged = Path(shutil.copy(built[2], tmp_path / "damaged.h5"))
    _flip_core_bytes(damaged)
    for path, expected in ((built[2], 0), (damaged, 1)):
        done = subprocess.run([sys.executable, "-m", "mpsdata.cli", "verify", str(path)], capture_output=True)
        assert done.returncode == expected, done.stderr.decode()


# -- show ------------------------------------------------------------------------------------------------------------
def test_show_writes_a_png(built, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, root, path, _ = built
    status, out, _ = _run(capsys, "show", path, "--out", tmp_path / "stored.png")
    assert status == 0 and str(tmp_path / "stored.png") in out
    status, _, _ = _run(capsys, "show", path, "--out", tmp_path / "sub" / "both.png", "--root", root)
    assert status == 0
    with PIL.Image.open(tmp_path / "stored.png") as one, PIL.Image.open(tmp_path / "sub" / "both.png") as two:
        assert one.format == two.format == "PNG"
        assert two.height > one.height  # the originals add a row
        pixels = np.asarray(one.convert("L"))
    assert pixels.std() > 10  # a figure, not a blank canvas


@pytest.mark.parametrize("site_dims", [None, "row"])
def test_show_channel_site_file(tmp_path: Path, no_md5: None, capsys: pytest.CaptureFixture, site_dims) -> None:
    """Files built with channel_mode="site" keep ``channel_site`` in their stored layout, so ``show`` reads them
    (a regression test: it once failed on them)."""
    write_cifar(tmp_path, per_batch=2, num_test=4)
    path = mpsdata.MPSCIFAR10(tmp_path, train=False, channel_mode="site", site_dims=site_dims).archive
    status, _, err = _run(capsys, "show", path, "--out", tmp_path / "grid.png", "--root", tmp_path)
    assert status == 0, err
    with PIL.Image.open(tmp_path / "grid.png") as img:
        assert img.format == "PNG"


def test_show_with_root_lacking_raw_data(built, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With --root holding no raw files, a one-line error, not a traceback (a regression test)."""
    status, _, err = _run(capsys, "show", built[2], "--out", tmp_path / "x.png", "--root", tmp_path / "nothing")
    assert status == 1 and err.startswith("mpsdata show: error: ")
    assert not (tmp_path / "x.png").exists()
