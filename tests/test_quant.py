"""Quantised MPS cores (``mpsdata._quant``): byte accounting, byte budgets, gauge, quantisers, refit, search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mpsdata
from mpsdata import _budget, _engine
from mpsdata import _quant as Q
from mpsdata._layout import make_layout

site_lists = st.lists(st.integers(2, 6), min_size=2, max_size=5)


def _random_mps(batch: int, sites, bonds, seed: int = 0, terms: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    total = int(_engine.core_offsets(sites, bonds)[-1])
    return torch.randn(batch, terms, total, generator=g, dtype=torch.float64)


def _contract(packed: torch.Tensor, sites, bonds) -> torch.Tensor:
    """Dense tensors of packed cores ``(B, terms, P)`` (terms summed), via the torch path."""
    return _engine.decode(packed, np.arange(math.prod(sites)), sites, bonds, backend="torch")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return float((10 * torch.log10(255**2 / mse.clamp_min(1e-12))).mean())


# -- byte accounting ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", Q.SCHEMES)
@pytest.mark.parametrize("terms", [1, 2])
def test_nbytes_counts_what_is_stored(scheme: str, terms: int) -> None:
    sites, bonds = (2, 4, 7, 7, 2), (2, 5, 5, 2)
    q = Q.quantize(_random_mps(3, sites, bonds, terms=terms), sites, bonds, scheme)
    stored_values = q.values[0].numel() * q.values.element_size()
    scale_bytes = 0 if q.scales is None else terms * (2 * (len(sites) - 1) + 4)  # float16 x (n-1) + float32
    assert q.nbytes.tolist() == [stored_values + scale_bytes] * 3
    assert Q.nbytes_per_image(sites, bonds, terms, scheme) == stored_values + scale_bytes


def test_int4_packs_two_values_per_byte() -> None:
    sites, bonds = (3, 3, 3), (3, 3)  # 9 + 27 + 9 = 45 values: odd, so one padding nibble
    q = Q.quantize(_random_mps(2, sites, bonds), sites, bonds, "int4")
    assert q.values.dtype == torch.uint8 and q.values.shape == (2, 1, 23)


def test_pack_unpack_int4_roundtrip() -> None:
    codes = torch.arange(-7, 8, dtype=torch.int8).repeat(3)[:-1].reshape(1, 1, -1)  # 44 values
    assert torch.equal(Q._unpack_int4(Q._pack_int4(codes), codes.shape[-1]), codes)


@settings(max_examples=40, deadline=None)
@given(site_lists, st.floats(0.05, 3.0), st.sampled_from(Q.SCHEMES), st.integers(1, 2))
def test_bonds_for_bytes_never_exceed_the_budget(sites, ratio, scheme, terms) -> None:
    values = math.prod(sites)
    try:
        bonds = Q.bonds_for_bytes(sites, ratio, values, terms, scheme)
    except ValueError:
        smallest = Q.nbytes_per_image(sites, [1] * (len(sites) - 1), terms, scheme)
        assert smallest > math.floor(ratio * values + 1e-9)
        return
    assert Q.nbytes_per_image(sites, bonds, terms, scheme) <= math.floor(ratio * values + 1e-9)
    assert bonds == _budget.tighten(bonds, sites)


@settings(max_examples=30, deadline=None)
@given(site_lists, st.floats(0.1, 1.0), st.sampled_from(Q.SCHEMES))
def test_bonds_for_bytes_grow_with_the_budget(sites, ratio, scheme) -> None:
    values = math.prod(sites)
    try:
        small = Q.bonds_for_bytes(sites, ratio, values, 1, scheme)
    except ValueError:
        return
    large = Q.bonds_for_bytes(sites, ratio * 1.5, values, 1, scheme)
    assert _budget.num_params(large, sites) >= _budget.num_params(small, sites)


def test_smaller_schemes_buy_larger_bonds() -> None:
    sites = (49, 4, 4)
    params = [_budget.num_params(Q.bonds_for_bytes(sites, 0.4, 784, 1, s), sites) for s in Q.SCHEMES]
    assert params == sorted(params)  # float32 < float16 < int8 < int4
    assert params[0] < params[-1]


def test_bonds_for_bytes_errors() -> None:
    with pytest.raises(ValueError, match="too small for any int8 MPS"):
        Q.bonds_for_bytes((49, 4, 4), 0.01, 784)
    with pytest.raises(ValueError, match="positive and finite"):
        Q.bonds_for_bytes((49, 4, 4), 0.0, 784)
    with pytest.raises(TypeError, match="bytes_ratio must be a number"):
        Q.bonds_for_bytes((49, 4, 4), "0.3", 784)
    with pytest.raises(ValueError, match="scheme must be one of"):
        Q.bonds_for_bytes((49, 4, 4), 0.3, 784, scheme="int2")
    with pytest.raises(TypeError, match="scheme must be a string"):
        Q.nbytes_per_image((49, 4, 4), (8, 4), scheme=8)


# -- gauge and quantisers -------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(site_lists, st.integers(0, 1000))
def test_left_canonical_keeps_the_tensor_and_makes_isometries(sites, seed) -> None:
    bonds = _budget.tighten([3] * (len(sites) - 1), sites)
    packed = _random_mps(2, sites, bonds, seed)
    canon = Q.left_canonical(packed, sites, bonds)
    assert torch.allclose(_contract(canon, sites, bonds), _contract(packed, sites, bonds), rtol=1e-9, atol=1e-9)
    for core in _engine.unpack(canon[:, 0], sites, bonds)[:-1]:
        mat = core.reshape(2, -1, core.shape[-1])
        eye = torch.eye(mat.shape[-1], dtype=torch.float64).expand(2, -1, -1)
        assert torch.allclose(mat.mT @ mat, eye, atol=1e-10)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantisation_error_is_within_half_a_level(scheme: str) -> None:
    sites, bonds = (4, 4, 4, 4), (4, 4, 4)
    packed = Q.left_canonical(_random_mps(5, sites, bonds, seed=3), sites, bonds)
    q = Q.quantize(packed, sites, bonds, scheme)
    back = q.dequantize().double()
    offs = _engine.core_offsets(sites, bonds)
    level = Q._LEVELS[scheme]
    for k in range(len(sites)):
        err = (back[..., offs[k] : offs[k + 1]] - packed[..., offs[k] : offs[k + 1]]).abs().amax(-1)
        assert bool((err <= q.scales[..., k].double() / (2 * level) * (1 + 1e-5) + 1e-12).all())


def test_scales_are_float16_except_the_last() -> None:
    sites, bonds = (4, 4, 4), (4, 4)
    packed = _random_mps(4, sites, bonds, seed=1) * 1e5  # the last core carries a norm beyond float16
    q = Q.quantize(Q.left_canonical(packed, sites, bonds), sites, bonds, "int8")
    head = q.scales[..., :-1]
    assert torch.equal(head.to(torch.float16).to(torch.float32), head)
    assert bool(torch.isfinite(q.scales).all()) and float(q.scales[..., -1].max()) > 65504
    rel = (_contract(q.dequantize().double(), sites, bonds) - _contract(packed, sites, bonds)).norm(dim=-1)
    assert bool((rel / _contract(packed, sites, bonds).norm(dim=-1) < 0.05).all())


def test_float16_scheme_is_half_precision() -> None:
    sites, bonds = (4, 4, 4), (4, 4)
    packed = _random_mps(2, sites, bonds)
    q = Q.quantize(packed, sites, bonds, "float16")
    assert q.scales is None and q.values.dtype == torch.float16
    assert torch.equal(q.dequantize(), packed.to(torch.float16).to(torch.float32))


def test_zero_image_quantises_to_zero() -> None:
    x = torch.zeros(2, 64, dtype=torch.float64)
    q = Q.quantize_refit(x, (4, 4, 4), (2, 2), scheme="int8", sweeps=1)
    assert bool((_contract(q.dequantize().double(), (4, 4, 4), (2, 2)) == 0).all())
    assert bool((q.scales[..., -1] == 0).all())  # the norm, carried by the last core


def test_empty_batch() -> None:
    sites, bonds = (4, 4, 4), (2, 2)
    q = Q.quantize(torch.zeros(0, 1, int(_engine.core_offsets(sites, bonds)[-1])), sites, bonds, "int4")
    assert q.nbytes.shape == (0,) and q.dequantize().shape == (0, 1, 32)


def test_quantize_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(B, terms, P\)"):
        Q.quantize(torch.zeros(3, 24), (4, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="need 32"):
        Q.quantize(torch.zeros(3, 1, 25), (4, 4, 4), (2, 2))  # 4 * 2 + 2 * 4 * 2 + 2 * 4 = 32
    with pytest.raises(ValueError, match="not tight"):
        Q.quantize_refit(torch.zeros(3, 64), (4, 4, 4), (8, 2))
    with pytest.raises(ValueError, match="x_sites must have shape"):
        Q.quantize_refit(torch.zeros(3, 63), (4, 4, 4), (2, 2))


# -- refit on real images -------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_refit_beats_plain_rounding_and_sweeps_never_hurt(fashion_images: torch.Tensor, scheme: str) -> None:
    x = fashion_images[:32].double()
    layout = make_layout(28, 28, site_dims="hierarchical")
    bonds = Q.bonds_for_bytes(layout.site_dims, 0.3, 784, 1, scheme)
    m = mpsdata.decompose(x, bond_dims=bonds, site_dims="hierarchical", dtype=torch.float64)
    plain = Q.quantize_mps(m, scheme)
    refit = Q.quantize_mps(m, scheme, x=x)
    swept = Q.quantize_mps(m, scheme, x=x, sweeps=1)

    def err(q):
        return (Q.reconstruct(q, layout).double() - x).flatten(1).norm(dim=1)

    assert float(err(refit).mean()) <= float(err(plain).mean()) * (1 + 1e-6)
    assert bool((err(swept) <= err(refit) * (1 + 1e-9)).all())  # ALS keeps a core only where it helps
    if scheme == "int4":  # coarse grid: the refit must gain visibly
        assert _psnr(Q.reconstruct(swept, layout, torch.uint8), x) > _psnr(Q.reconstruct(plain, layout, torch.uint8), x)
    expected = [Q.nbytes_per_image(layout.site_dims, bonds, 1, scheme)] * 32
    assert refit.nbytes.tolist() == plain.nbytes.tolist() == expected


def test_refit_residual_term_repairs_quantisation(fashion_images: torch.Tensor) -> None:
    x = fashion_images[:64].double()
    layout = make_layout(28, 28, site_dims=[28, 28])
    sites = layout.site_dims
    one = Q.quantize_refit(layout.to_sites(x), sites, (4,), 1, "int4")
    two = Q.quantize_refit(layout.to_sites(x), sites, (4,), 2, "int4")
    e1 = (Q.reconstruct(one, layout).double() - x).norm()
    e2 = (Q.reconstruct(two, layout).double() - x).norm()
    assert e2 < e1
    assert int(two.nbytes[0]) == 2 * int(one.nbytes[0])


def test_quantize_mps_sweeps_need_images() -> None:
    m = mpsdata.decompose(torch.rand(2, 8, 8), bond_dims=[2, 2], site_dims=[4, 4, 4])
    with pytest.raises(ValueError, match="pass x"):
        Q.quantize_mps(m, "int8", sweeps=1)


def test_quantize_mps_handles_channels_as_batch() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 8, 8, generator=g) * 255).round()
    m = mpsdata.decompose(x, bond_dims=[4, 4], site_dims=[4, 4, 4])
    q = Q.quantize_mps(m, "int8", x=x)
    assert q.values.shape[0] == 6
    rec = Q.reconstruct(q, m.layout).reshape(x.shape)
    assert float((rec - m.reconstruct()).abs().max()) < 255 * 0.05


# -- search ---------------------------------------------------------------------------------------------
def test_search_layout_picks_the_best_candidate_within_budget(fashion_images: torch.Tensor) -> None:
    x = fashion_images[:16]
    found = Q.search_layout(x, 0.3, "int8", site_dims=["hierarchical", [28, 28], [4, 7, 28]])
    cands = found["candidates"]
    assert len(cands) == 5  # 3 layouts x 2 domains, less the DCT of [28, 28] (same singular values as pixels)
    assert not any(c["layout"] == (28, 28) and c["domain"] == "dct" for c in cands)
    assert found["best"]["psnr"] == max(c["psnr"] for c in cands)
    assert all(c["bytes_ratio"] <= 0.3 for c in cands)
    assert {c["domain"] for c in cands} == {"pixels", "dct"}
    # the reported figures are what apply_layout gives with the chosen settings
    best = found["best"]
    rec, nbytes, bonds = Q.apply_layout(x, 0.3, "int8", site_dims=best["site_dims"], domain=best["domain"])
    assert _psnr(rec, x) == pytest.approx(best["psnr"], abs=1e-9)
    assert (nbytes / 784, bonds) == (best["bytes_ratio"], best["bond_dims"])
    assert rec.shape == (16, 28, 28) and rec.dtype == torch.uint8


def test_search_layout_colour_options() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(6, 1, 16, 16, generator=g) * 200
    x = torch.cat([base, base * 0.9 + 10, base * 0.8 + 20], 1).round().to(torch.uint8)  # strongly correlated
    found = Q.search_layout(x, 0.5, "int8", site_dims=["hierarchical"], domains=("pixels",))
    colours = {(c["colour"], c["luma_share"]) for c in found["candidates"]}
    assert colours == {("rgb", None), ("rgb-site", None), ("ycc", 0.5), ("ycc", 0.7)}
    ycc = max((c for c in found["candidates"] if c["colour"] == "ycc"), key=lambda c: c["psnr"])
    rgb = next(c for c in found["candidates"] if c["colour"] == "rgb")
    assert ycc["psnr"] > rgb["psnr"]  # nearly gray images: luma/chroma puts the bytes where the signal is


def test_apply_layout_errors() -> None:
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="colour must be"):
        Q.apply_layout(x, 0.5, colour="lab")
    with pytest.raises(ValueError, match="domain must be"):
        Q.apply_layout(x, 0.5, domain="wavelet")


def test_search_layout_errors() -> None:
    with pytest.raises(ValueError, match="no layout meets"):
        Q.search_layout(torch.zeros(2, 8, 8, dtype=torch.uint8), 0.01)
    with pytest.raises(ValueError, match="C 1 or 3"):
        Q.search_layout(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), 0.5)


@pytest.mark.needs_cuda
def test_refit_on_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 64, generator=g, dtype=torch.float64) * 255
    cpu = Q.quantize_refit(x, (4, 4, 4), (4, 4), 1, "int8")
    gpu = Q.quantize_refit(x.cuda(), (4, 4, 4), (4, 4), 1, "int8")
    assert gpu.values.device.type == "cuda"
    assert (gpu.values.cpu().int() - cpu.values.int()).abs().max() <= 1
