"""Transform domain (pixels / DCT), colour handling (RGB / luma-chroma) and ``site_dims="auto"`` end to end:
``decompose``, the search, core files, datasets and the command line.

The two equivalences the search relies on are checked numerically: an orthonormal transform of one site's
physical index (luma/chroma on the channel site, the DCT's row and column factors on the two sites of
``[H, W]``) leaves the singular values at every bond unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from fakes import fake_images, write_cifar, write_mnist

import mpsdata
from mpsdata import _mps, _quant
from mpsdata._archive import TRANSFORM_FORMAT_VERSION, CoreFile
from mpsdata._layout import make_layout
from mpsdata._shared import colour_transform
from mpsdata._signal import dct2, psnr
from mpsdata.cli import main
from mpsdata.datasets import _base


def _rgb(count: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(fake_images(count, size, size, channels=3, seed=seed)).permute(0, 3, 1, 2).contiguous()


def _schmidt(x: torch.Tensor, site_dims, channels: int, mode: str) -> list[torch.Tensor]:
    """Singular values of every bond's unfolding of images in a layout."""
    layout = make_layout(x.shape[-2], x.shape[-1], channels, site_dims, mode)
    sites = layout.to_sites(x.to(torch.float64)).reshape(x.shape[0], -1)
    values, left = [], 1
    for j in layout.site_dims[:-1]:
        left *= j
        values.append(torch.linalg.svdvals(sites.reshape(x.shape[0], left, -1)))
    return values


# -- the equivalences ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("site_dims", ["hierarchical", "row", [16, 16]])
def test_luma_chroma_on_the_channel_site_keeps_every_singular_value(site_dims) -> None:
    x = _rgb()
    ycc_planes = colour_transform(x.double())
    for rgb, ycc in zip(_schmidt(x, site_dims, 3, "site"), _schmidt(ycc_planes, site_dims, 3, "site")):
        torch.testing.assert_close(rgb, ycc, rtol=1e-9, atol=1e-7)
    a = mpsdata.decompose(x.double(), max_bond=3, site_dims=site_dims, channel_mode="site")
    b = mpsdata.decompose(x.double(), max_bond=3, site_dims=site_dims, channel_mode="site", colour="ycc")
    torch.testing.assert_close(a.error, b.error, rtol=1e-7, atol=1e-6)  # same bonds, same error


def test_dct_of_the_two_site_matrix_keeps_its_singular_values_but_not_of_longer_chains() -> None:
    x = _rgb()[:, 0]
    (plain,), (dct,) = _schmidt(x, [16, 16], 1, "separate"), _schmidt(dct2(x.double()), [16, 16], 1, "separate")
    torch.testing.assert_close(plain, dct, rtol=1e-9, atol=1e-7)
    a = mpsdata.decompose(x.double(), bond_dims=[3], site_dims=[16, 16])
    b = mpsdata.decompose(x.double(), bond_dims=[3], site_dims=[16, 16], domain="dct")
    torch.testing.assert_close(a.error, b.error, rtol=1e-7, atol=1e-6)
    # On a hierarchical chain the DCT mixes sites: the spectra differ, so the search must try it there.
    chain = _schmidt(x, "hierarchical", 1, "separate")[1]
    chain_dct = _schmidt(dct2(x.double()), "hierarchical", 1, "separate")[1]
    assert (chain - chain_dct).abs().max() > 1


def test_search_skips_the_equivalent_candidates() -> None:
    x = _rgb(4)
    found = _quant.search_layout(x, 0.5, "int8", site_dims=["hierarchical", [16, 16]])
    seen = {(c["layout"], c["domain"], c["colour"]) for c in found["candidates"]}
    assert ((16, 16), "dct", "rgb") not in seen and ((16, 16), "pixels", "rgb") in seen
    assert ((16, 16, 3), "dct", "rgb-site") not in seen and ((16, 16, 3), "pixels", "rgb-site") in seen
    assert ((4, 4, 4, 4), "dct", "rgb") in seen and ((4, 4, 4, 4, 3), "dct", "rgb-site") in seen
    site = _mps.search(x, bytes_ratio=0.5, channel_mode="site")
    assert {c["colour"] for c in site["candidates"]} == {"rgb-site"}


# -- decompose ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["separate", "site"])
@pytest.mark.parametrize(("domain", "colour"), [("dct", "rgb"), ("pixels", "ycc"), ("dct", "ycc")])
def test_full_bonds_round_trip_exactly(mode: str, domain: str, colour: str) -> None:
    x = _rgb(3, 8)
    m = mpsdata.decompose(x, max_bond=64, site_dims="hierarchical", channel_mode=mode, domain=domain, colour=colour)
    assert (m.domain, m.colour) == (domain, colour)
    assert torch.equal(m.reconstruct(torch.uint8), x)
    assert float((m.reconstruct() - x).abs().max()) < 1e-3
    assert float(m.error.max()) < 1e-2


def test_defaults_are_unchanged() -> None:
    x = _rgb(4)
    for budget in ({"ratio": 0.3}, {"bytes_ratio": 0.3}):
        plain = mpsdata.decompose(x, **budget)
        named = mpsdata.decompose(x, **budget, domain="pixels", colour="rgb")
        assert torch.equal(plain._packed, named._packed) and torch.equal(plain.error, named.error)
        assert (plain.domain, plain.colour, plain.luma_share, plain.chroma_bond_dims) == ("pixels", "rgb", None, None)
        assert "domain" not in repr(plain)


def test_luma_chroma_split_the_byte_budget() -> None:
    x = _rgb(5)
    budget = 0.4
    m = mpsdata.decompose(x, bytes_ratio=budget, site_dims=[16, 16], colour="ycc", luma_share=0.6)
    assert m.luma_share == 0.6 and m.chroma_bond_dims is not None
    assert all(c <= b for c, b in zip(m.chroma_bond_dims, m.bond_dims))
    per_image = m.nbytes.sum(-1)
    assert bool((per_image <= budget * 3 * 16 * 16).all())
    luma, chroma = m.nbytes[0, 0].item(), m.nbytes[0, 1].item()
    assert luma <= 0.6 * budget * 3 * 256 and chroma <= 0.2 * budget * 3 * 256 and luma > chroma
    assert bool((m.ranks[:, 1:] <= torch.tensor(m.chroma_bond_dims)).all())  # chroma cores padded with zeros
    rec = m.reconstruct(torch.uint8)
    # The error is measured in RGB, per channel, on what reconstruct gives.
    torch.testing.assert_close(m.error, (m.reconstruct() - x.float()).flatten(2).norm(dim=-1), rtol=1e-5, atol=1e-3)
    assert rec.shape == x.shape and float(psnr(rec, x).mean()) > 20
    # Indexing keeps an image's planes together; to() keeps the transform.
    assert torch.equal(m[1:3].reconstruct(torch.uint8), rec[1:3])
    assert torch.equal(m.to("cpu").reconstruct(torch.uint8), rec)
    with pytest.raises(IndexError, match="luma and chroma planes"):
        m[:, 0]
    # With the channel as a site there is nothing to split.
    site = mpsdata.decompose(x, bytes_ratio=budget, site_dims=[16, 16], colour="ycc", channel_mode="site")
    assert site.luma_share is None and site.chroma_bond_dims is None


def test_ycc_int4_and_ratio_budgets() -> None:
    x = _rgb(3)
    q = mpsdata.decompose(x, bytes_ratio=0.4, core_dtype="int4", site_dims="hierarchical", colour="ycc")
    assert q._quantized is not None and q._quantized.bond_dims == q.bond_dims
    torch.testing.assert_close(q._quantized.dequantize(), q._packed.float())  # padded codes decode to the cores
    r = mpsdata.decompose(x, ratio=0.3, site_dims="hierarchical", colour="ycc", luma_share=0.5)
    assert float(r.ratio.mean(-1).max()) <= 0.3 + 1e-9  # per image (three planes), the ratio holds


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"domain": "wavelet"}, ValueError, "domain must be one of"),
        ({"domain": 1}, TypeError, "domain must be a string"),
        ({"colour": "lab"}, ValueError, "colour must be one of"),
        ({"colour": "ycc", "luma_share": 1.0}, ValueError, r"luma_share must be in \(0, 1\)"),
        ({"colour": "ycc", "luma_share": "half"}, TypeError, "luma_share must be a number"),
        ({"luma_share": 0.5}, ValueError, "colour='ycc' only"),
        ({"colour": "ycc", "luma_share": 0.5, "channel_mode": "site"}, ValueError, "channel_mode='separate'"),
        ({"colour": "ycc", "luma_share": 0.9, "bytes_ratio": 0.1, "ratio": None}, ValueError, "chroma plane"),
    ],
)
def test_bad_transform_options(kwargs, error, match) -> None:
    options = {"ratio": 0.3, **kwargs}
    with pytest.raises(error, match=match):
        mpsdata.decompose(_rgb(2), **options)


def test_ycc_needs_three_channels_and_a_split_needs_a_ratio() -> None:
    for site_dims in (None, "auto"):
        with pytest.raises(ValueError, match="3-channel images"):
            mpsdata.decompose(torch.rand(2, 8, 8), ratio=0.5, colour="ycc", site_dims=site_dims)
    with pytest.raises(ValueError, match="luma_share splits a ratio or bytes_ratio"):
        mpsdata.decompose(_rgb(2), max_bond=2, colour="ycc", luma_share=0.5)


# -- site_dims="auto" -------------------------------------------------------------------------------------------
def test_auto_picks_luma_chroma_when_the_colour_is_redundant() -> None:
    """Gray content in three equal channels: luma holds everything, so luma/chroma must win."""
    gray = torch.from_numpy(fake_images(12, 16, 16, seed=5))
    x = gray[:, None].repeat(1, 3, 1, 1)
    m = mpsdata.decompose(x, bytes_ratio=0.3, site_dims="auto")
    best = m.search["best"]
    assert (m.colour, best["colour"]) == ("ycc", "ycc") and m.luma_share == best["luma_share"]
    rgb_best = max(c["psnr"] for c in m.search["candidates"] if c["colour"] == "rgb")
    assert best["psnr"] > rgb_best + 3  # a clear win, not a tie
    assert m.site_dims == best["layout"] and m.domain == best["domain"]
    got = float(psnr(m.reconstruct(torch.uint8), x).mean())
    assert got == pytest.approx(best["psnr"], abs=1e-9)  # the search scored exactly what decompose gives


def test_auto_never_loses_to_the_default_and_honours_a_fixed_domain() -> None:
    x = _rgb(8)
    default = float(psnr(mpsdata.decompose(x, bytes_ratio=0.3).reconstruct(torch.uint8), x).mean())
    auto = mpsdata.decompose(x, bytes_ratio=0.3, site_dims="auto")
    assert float(psnr(auto.reconstruct(torch.uint8), x).mean()) >= default - 1e-9
    fixed = mpsdata.decompose(x, bytes_ratio=0.3, site_dims="auto", domain="pixels", colour="rgb")
    assert {c["domain"] for c in fixed.search["candidates"]} == {"pixels"}
    assert {c["colour"] for c in fixed.search["candidates"]} == {"rgb"}
    assert (fixed.domain, fixed.colour) == ("pixels", "rgb")


def test_auto_on_real_fashion_mnist_beats_or_ties_the_default(fashion_images: torch.Tensor) -> None:
    x = fashion_images[:128]
    for budget in (0.1, 0.2):
        auto = mpsdata.decompose(x, bytes_ratio=budget, site_dims="auto")
        default = mpsdata.decompose(x, bytes_ratio=budget)
        got = float(psnr(auto.reconstruct(torch.uint8), x).mean())
        assert got >= float(psnr(default.reconstruct(torch.uint8), x).mean()) - 0.05  # searched on the first 64


# -- core files and datasets ---------------------------------------------------------------------------------------
@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


def _assert_mse_honest(ds, originals: torch.Tensor) -> None:
    decoded = ds.decode_batch(np.arange(len(ds))).double()
    measured = (decoded - originals.double()).square().flatten(1).mean(1)
    torch.testing.assert_close(ds._cores.mse.double(), measured, rtol=1e-6, atol=1e-6)


def test_dataset_with_dct_and_luma_chroma(tmp_path: Path, no_md5: None) -> None:
    splits = write_cifar(tmp_path)
    x = torch.from_numpy(splits["test"].images).permute(0, 3, 1, 2)
    options = {"bytes_ratio": 0.3, "channel_mode": "separate", "domain": "dct", "colour": "ycc"}
    ds = mpsdata.MPSCIFAR10(tmp_path, train=False, **options)
    _assert_mse_honest(ds, x)
    items = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
    np.testing.assert_array_equal(items, ds.decode_batch(range(len(ds))).permute(0, 2, 3, 1).numpy())
    m = mpsdata.decompose(x, **options)
    torch.testing.assert_close(ds.decode_batch(range(len(ds))), m.reconstruct(torch.uint8), rtol=0, atol=1)
    with h5py.File(ds.archive, "r", locking=False) as f:
        assert (f.attrs["domain"], f.attrs["colour"]) == ("dct", "ycc")
        assert f.attrs["format_version"] == TRANSFORM_FORMAT_VERSION == 3  # older readers refuse it
    assert (ds._cores.settings["domain"], ds._cores.settings["colour"]) == ("dct", "ycc")
    assert "luma_share" not in ds._cores.settings  # not given: the default, and the file name leaves it out
    plain = mpsdata.MPSCIFAR10(tmp_path, train=False, bytes_ratio=0.3, channel_mode="separate")
    assert plain.archive != ds.archive
    with h5py.File(plain.archive, "r", locking=False) as f:  # files of the defaults carry no transform attributes
        assert "domain" not in f.attrs and "colour" not in f.attrs
    assert (plain._cores.domain, plain._cores.colour, plain._cores.format_version) == ("pixels", "rgb", 2)
    with pytest.raises(ValueError, match="takes colour images"):
        mpsdata.MPSFashionMNIST(tmp_path, colour="ycc")
    with pytest.raises(ValueError, match="domain must be one of"):
        mpsdata.MPSCIFAR10(tmp_path, domain="fft")


def test_dataset_auto_searches_a_random_sample_and_stores_the_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits = write_mnist(tmp_path / "FashionMNIST" / "raw", num_train=40, num_test=30)
    monkeypatch.setattr(_base, "AUTO_SAMPLE", 12)
    monkeypatch.setattr(_base, "_BUILD_BATCH", 7)  # the sample is gathered across batches
    seen: list[torch.Tensor] = []
    real_search = _base.search

    def spy(sample, **kwargs):
        seen.append(sample.clone())
        return real_search(sample, **kwargs)

    monkeypatch.setattr(_base, "search", spy)
    ds = mpsdata.MPSFashionMNIST(tmp_path, train=False, bytes_ratio=0.3, site_dims="auto")
    wanted = np.sort(np.random.default_rng(_base.AUTO_SEED).choice(30, 12, replace=False))
    assert len(seen) == 1 and torch.equal(seen[0][:, 0], torch.from_numpy(splits["test"].images[wanted]))
    assert wanted.max() > 12  # spread over the split, not its first images
    settings = ds._cores.settings
    assert settings["site_dims"] == "auto" and settings["layout"] == "auto"
    found = ds._cores.search
    best = found["best"]
    assert tuple(ds._cores.geometry.layout.spatial_sites) == tuple(best["layout"])
    assert ds._cores.domain == best["domain"]
    assert len(found["candidates"]) > 3
    _assert_mse_honest(ds, torch.from_numpy(splits["test"].images)[:, None])
    # The same request reopens the same file without searching again.
    again = mpsdata.MPSFashionMNIST(tmp_path, train=False, bytes_ratio=0.3, site_dims="auto")
    assert again.archive == ds.archive and len(seen) == 1
    with pytest.raises(ValueError, match="ratio or bytes_ratio"):
        mpsdata.MPSFashionMNIST(tmp_path, train=False, max_bond=3, site_dims="auto")


def test_cli_builds_auto_with_a_fixed_domain(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_mnist(tmp_path / "raw", num_train=30, num_test=20)
    root = tmp_path / "data"
    argv = ["build", "fashion-mnist", "--root", root, "--raw", tmp_path / "raw", "--split", "test"]
    argv += ["--bytes-ratio", "0.3", "--site-dims", "auto", "--domain", "dct"]
    assert main([str(a) for a in argv]) == 0
    (path,) = (root / "FashionMNIST" / "mps").glob("*.h5")
    cores = CoreFile(path)
    assert cores.settings["site_dims"] == "auto" and cores.settings["domain"] == "dct"
    assert cores.domain == "dct" and {c["domain"] for c in cores.search["candidates"]} == {"dct"}
    capsys.readouterr()
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["domain"] == "dct" and info["colour"] == "rgb"
    assert main(["verify", str(path)]) == 0
