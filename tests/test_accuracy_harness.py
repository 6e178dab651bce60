"""The accuracy benchmark's pieces that are code: training sets per method, budget accounting, caching, the
validation split and the choice of mpsdata best, the summaries, and the GPU script on fake CIFAR files (CPU)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import accuracy
import accuracy_gpu
from accuracy import Arm, Builder
from fakes import write_cifar, write_mnist

import mpsdata
from mpsdata import baselines


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory):
    """A fake Fashion-MNIST root (64 training images) and a builder over all of its training images."""
    root = tmp_path_factory.mktemp("fashion")
    write_mnist(root / "FashionMNIST" / "raw", num_train=64, num_test=16)
    train_x, train_y, _, _ = accuracy.load_fashion(root / "FashionMNIST" / "raw")
    builder = Builder(accuracy.fashion_spec(root), train_x, train_y, root / "cache", log=lambda msg: None)
    return builder


def mps_params(bond_dims, site_dims, terms: int) -> int:
    bonds = [1, *bond_dims, 1]
    return terms * sum(bonds[k] * j * bonds[k + 1] for k, j in enumerate(site_dims))


# -- training sets and their budgets ---------------------------------------------------------------------
def test_whole_is_the_pool_at_one_byte_per_pixel(fashion: Builder) -> None:
    ts = fashion.training_set(Arm("whole"))
    assert torch.equal(ts.images, fashion.pool) and torch.equal(ts.targets, fashion.targets)
    assert ts.info["ratio"] == 1.0 and ts.info["bytes_ratio"] == 1.0 and ts.info["train_images"] == 64


def test_random_coreset_keeps_originals_with_their_labels(fashion: Builder) -> None:
    a = fashion.training_set(Arm("random", 0.4), seed=0)
    b = fashion.training_set(Arm("random", 0.4), seed=1)
    assert len(a.images) == math.floor(0.4 * 64) == a.info["train_images"]
    assert a.info["bytes_ratio"] == pytest.approx(25 / 64) and a.info["ratio"] == pytest.approx(25 / 64)
    flat = fashion.pool.flatten(1)
    for image, target in zip(a.images, a.targets, strict=True):
        matches = (flat == image.flatten()).all(1).nonzero().flatten()
        assert len(matches) >= 1 and any(int(fashion.targets[i]) == int(target) for i in matches)
    assert not torch.equal(a.images, b.images)  # the training seed draws the subset
    assert torch.equal(a.images, fashion.training_set(Arm("random", 0.4), seed=0).images)


def test_random_coreset_at_equal_bytes_uses_the_byte_budget(fashion: Builder) -> None:
    ts = fashion.training_set(Arm("random", bytes_ratio=0.7, axis="bytes"), seed=0)
    assert len(ts.images) == math.floor(0.7 * 64)
    assert Arm("random", bytes_ratio=0.7, axis="bytes").name == "random bytes=0.700"


def test_kcenter_subsets_are_prefixes_of_one_cached_order(fashion: Builder, monkeypatch) -> None:
    big = fashion.kcenter_indices(0.7)
    small = fashion.kcenter_indices(0.4)
    assert len(big) == math.floor(0.7 * 64) and torch.equal(small, big[: math.floor(0.4 * 64)])
    assert torch.equal(big, baselines.k_center_coreset(fashion.pool.reshape(64, -1), 0.7, seed=0))

    def boom(*args, **kwargs):
        raise AssertionError("k-center recomputed although cached")

    monkeypatch.setattr(baselines, "k_center_coreset", boom)
    ts = fashion.training_set(Arm("k-center", 0.4))
    assert torch.equal(ts.images, fashion.pool[small.sort().values])
    assert ts.info["bytes_ratio"] == pytest.approx(25 / 64)


@pytest.mark.parametrize("config", sorted(accuracy.FASHION_MPS_CONFIGS))
def test_mps_arm_serves_the_core_file_and_counts_two_bytes_per_parameter(fashion: Builder, config: str) -> None:
    options = accuracy.FASHION_MPS_CONFIGS[config]
    ts = fashion.training_set(Arm("mps", 0.4, config=config))
    m = mpsdata.decompose(fashion.pool[:, 0], 0.4, site_dims=options["site_dims"], residual=options["residual"])
    direct = m.reconstruct(torch.uint8)[:, None]
    # float16 cores in the file against float64 here: at most a couple of grey levels apart
    assert ts.images.dtype == torch.uint8 and ts.images.shape == fashion.pool.shape
    assert (ts.images.int() - direct.int()).abs().max() <= 3
    params = mps_params(m.bond_dims, m.site_dims, options["residual"] + 1)
    assert ts.info["ratio"] == pytest.approx(params / 784) and ts.info["ratio"] <= 0.4
    assert ts.info["bytes_per_image"] == pytest.approx(2 * params)
    assert ts.info["file_bytes_ratio"] > ts.info["bytes_ratio"] * 0.9
    assert ts.info["settings"]["bond_dims"] == list(m.bond_dims)
    assert ts.info["psnr"] == pytest.approx(accuracy.psnr(ts.images, fashion.pool))


def test_svd_counts_four_bytes_per_parameter(fashion: Builder) -> None:
    svd = fashion.training_set(Arm("svd", 0.4))
    rank = math.floor(0.4 * 784 / 56)
    assert svd.info["settings"]["rank"] == rank
    assert svd.info["bytes_per_image"] == 4 * rank * 56 and svd.info["ratio"] == pytest.approx(rank * 56 / 784)


@pytest.mark.slow  # ICE's first call compiles its kernels: 7 s here, minutes on a loaded machine
def test_ice_counts_four_bytes_per_parameter(fashion: Builder) -> None:
    ice = fashion.training_set(Arm("ice+dct", 0.4))
    assert ice.info["settings"]["site_dims"] == [49, 4, 4]  # the explicit hierarchical sites
    assert ice.info["bytes_per_image"] == pytest.approx(4 * ice.info["ratio"] * 784)


def test_codecs_and_downsampling_stay_within_the_byte_budget(fashion: Builder) -> None:
    for method in ("webp", "jpeg"):
        ts = fashion.training_set(Arm(method, bytes_ratio=0.5, axis="bytes"))
        assert ts.info["settings"]["max_image_bytes_ratio"] <= 0.5
        assert 0 < ts.info["bytes_ratio"] <= 0.5 and ts.info["ratio"] is None
    ds = fashion.training_set(Arm("downsample", bytes_ratio=0.5, axis="bytes"))
    h, w = ds.info["settings"]["size"]
    assert h * w <= 0.5 * 784 and ds.info["bytes_per_image"] == h * w


def test_reconstructions_are_cached_on_disk(fashion: Builder, monkeypatch) -> None:
    first = fashion.training_set(Arm("svd", 0.2))

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(baselines, "svd", boom)
    again = Builder(fashion.spec, fashion.pool, fashion.targets, fashion.cache, log=lambda msg: None)
    second = again.training_set(Arm("svd", 0.2))
    assert torch.equal(first.images, second.images) and first.info == second.info


def test_mps_arm_refuses_a_pool_that_is_not_the_dataset(fashion: Builder) -> None:
    shuffled = Builder(fashion.spec, fashion.pool.flip(0), fashion.targets.flip(0), fashion.cache / "other")
    if torch.equal(fashion.targets.flip(0), fashion.targets):
        pytest.skip("palindromic labels")
    with pytest.raises(ValueError, match="first 64 images"):
        shuffled.training_set(Arm("mps", 0.4, config="row"))


def test_fashion_root_cut_to_the_pool_holds_the_first_images(tmp_path: Path) -> None:
    write_mnist(tmp_path / "src", num_train=20, num_test=4)
    root = accuracy.fashion_root(tmp_path / "src", tmp_path / "root", limit=7)
    raw = root / "FashionMNIST" / "raw"
    full = accuracy.load_fashion(tmp_path / "src")
    cut = accuracy.load_fashion(raw)
    assert torch.equal(cut[0], full[0][:7]) and torch.equal(cut[1], full[1][:7])
    assert torch.equal(cut[2], full[2]) and (raw / "t10k-images-idx3-ubyte.gz").is_symlink()
    assert len(mpsdata.MPSFashionMNIST(root, train=True, ratio=0.4, archive_dir=tmp_path / "mps")) == 7


def test_svd_layout_is_the_svd_stored_in_float16(fashion: Builder) -> None:
    svd = fashion.training_set(Arm("svd", 0.4))
    mps = fashion.training_set(Arm("mps", 0.4, config="svd-layout"))
    assert mps.info["settings"]["bond_dims"] == [svd.info["settings"]["rank"]]
    assert mps.info["ratio"] == pytest.approx(svd.info["ratio"])
    assert mps.info["bytes_per_image"] == svd.info["bytes_per_image"] / 2  # float16 against float32
    assert (mps.images.int() - svd.images.int()).abs().max() <= 3  # the same truncated SVD


def test_robust_cp_falls_back_to_a_lower_rank_and_keeps_the_budget() -> None:
    x = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    x[0, 0, 10:14, 5:20] = 200  # rank 1: TensorLy's ALS at rank 9 hits a singular matrix
    g = torch.Generator().manual_seed(0)
    x[1:] = torch.randint(0, 256, (2, 1, 28, 28), generator=g, dtype=torch.uint8)
    with pytest.raises(np.linalg.LinAlgError):
        baselines.cp(x[:1], 0.7)
    images, info = accuracy.robust_cp(x, 0.7, chunk=2)
    assert torch.equal(images[0], x[0])  # exact below its own rank
    assert torch.equal(images[1:], baselines.cp(x[1:], 0.7).images)
    assert info["settings"]["lower_rank_fallbacks"] == 1 and info["settings"]["fallback_images"] == [0]
    assert info["bytes_per_image"] == 4 * 9 * 56  # counted at the nominal rank


# -- selection and summaries -----------------------------------------------------------------------------
def test_validation_split_is_disjoint_complete_and_deterministic() -> None:
    fit, val = accuracy.validation_split(100, 10)
    assert len(val) == 10 and len(fit) == 90
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(100))
    again = accuracy.validation_split(100, 10)
    assert torch.equal(fit, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, accuracy.validation_split(100, 10, seed=1)[1])
    with pytest.raises(ValueError, match="between 1 and"):
        accuracy.validation_split(10, 10)


def test_select_best_ranks_by_mean_then_bytes_then_name() -> None:
    scores = {"a": [0.80, 0.90], "b": [0.86, 0.84], "c": [0.85, 0.85], "d": [0.70]}
    # a, b, c tie on the mean (0.85): fewer bytes first, then the name
    assert accuracy.select_best(scores, {"a": 0.8, "b": 0.7, "c": 0.7, "d": 0.1}) == ["b", "c", "a", "d"]
    assert accuracy.select_best({"x": [0.5], "y": [0.6]}) == ["y", "x"]


def test_summarize_and_paired_differences() -> None:
    runs = {
        "whole|cnn|seed=0": {"test_acc": 0.90},
        "whole|cnn|seed=1": {"test_acc": 0.92},
        "whole|cnn|seed=2": {"test_acc": 0.91},
        "svd rho=0.4|cnn|seed=0": {"test_acc": 0.88},
        "svd rho=0.4|cnn|seed=1": {"test_acc": 0.89},
        "svd rho=0.4|mlp|seed=0": {"test_acc": 0.80},
    }
    summary = accuracy.summarize(runs)
    assert summary["whole|cnn"]["n"] == 3
    assert summary["whole|cnn"]["mean"] == pytest.approx(91.0)
    assert summary["whole|cnn"]["std"] == pytest.approx(statistics.stdev([90.0, 92.0, 91.0]))
    assert summary["svd rho=0.4|mlp"] == {"mean": pytest.approx(80.0), "std": None, "n": 1}
    diff = accuracy.paired(runs, "svd rho=0.4", "whole")
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(-2.5) and diff["std"] == pytest.approx(math.sqrt(0.5))


def test_markdown_marks_the_best_and_puts_the_paper_beside_it() -> None:
    configs = {"row": {}, "hier": {}}
    runs, data = {}, {"whole": {"ratio": 1.0, "bytes_ratio": 1.0}}
    for seed, acc in enumerate((0.90, 0.92)):
        runs[f"whole|cnn|seed={seed}"] = {"test_acc": acc}
        runs[f"mps row rho=0.4|cnn|seed={seed}"] = {"test_acc": acc - 0.01}
        runs[f"mps hier rho=0.4|cnn|seed={seed}"] = {"test_acc": acc - 0.02}
    data["mps row rho=0.4"] = {"ratio": 0.37, "bytes_ratio": 0.74, "file_bytes_ratio": 0.77, "psnr": 23.3}
    data["mps hier rho=0.4"] = {"ratio": 0.35, "bytes_ratio": 0.70, "psnr": 22.7}
    results = {
        "config": {"dataset": "fashion-mnist", "ratios": [0.4], "mps_configs": configs},
        "data": data,
        "runs": runs,
        "selection": {"0.4": {"scores": {"row": [0.9], "hier": [0.8]}, "ranking": ["row", "hier"], "best": "row"}},
    }
    text = accuracy.markdown(results)
    best = next(line for line in text.splitlines() if "mpsdata row **(best)**" in line)
    assert "90.00 ± 1.41 (2)" in best and "-1.00" in best and "91.46" in best and "0.740 (file 0.770)" in best
    hier = next(line for line in text.splitlines() if line.startswith("| mpsdata hier |"))
    assert "91.46" not in hier and "-2.00" in hier


def test_verdict_needs_two_standard_errors_a_floor_or_half_a_point_on_one_seed() -> None:
    assert accuracy.verdict({"mean": 0.5, "std": 0.2, "n": 3}) == "holds"  # 2 se = 0.23
    assert accuracy.verdict({"mean": 0.1, "std": 0.01, "n": 2}).endswith("(tie within seed noise)")  # floor 0.25
    assert accuracy.verdict({"mean": 0.2, "std": 0.2, "n": 3}).endswith("(tie within seed noise)")
    assert accuracy.verdict({"mean": -0.5, "std": 0.2, "n": 3}) == "does not hold (reversed)"
    assert accuracy.verdict({"mean": 0.4, "std": None, "n": 1}).endswith("(tie within seed noise)")
    assert accuracy.verdict({"mean": None, "std": None, "n": 0}) == "not measured"


def test_claims_pair_mpsdata_best_with_each_baseline_by_seed() -> None:
    runs = {}
    for seed, (mps, ice, whole) in enumerate([(0.880, 0.870, 0.889), (0.882, 0.871, 0.887), (0.879, 0.872, 0.888)]):
        runs[f"mps hier rho=0.4|cnn|seed={seed}"] = {"test_acc": mps}
        runs[f"ice+dct rho=0.4|cnn|seed={seed}"] = {"test_acc": ice}
        runs[f"whole|cnn|seed={seed}"] = {"test_acc": whole}
    results = {
        "config": {"mps_configs": {"hier": {"residual": 0}}},
        "runs": runs,
        "selection": {"0.4": {"best": "hier", "ranking": ["hier"]}},
    }
    lines = accuracy.claims(results).splitlines()
    ice = next(line for line in lines if "beats ICE (Table 1)" in line)
    assert "91.46 vs 91.42" in ice and "+0.93" in ice and ice.endswith("| holds |")
    near = next(line for line in lines if "within 1.0 point of whole" in line)
    assert "-0.77" in near and near.endswith("| met |")
    assert next(line for line in lines if "beats SVD" in line).endswith("| not measured |")


def test_results_keep_and_merge_runs_of_one_protocol(tmp_path: Path) -> None:
    config = {"dataset": "d", "epochs": 3, "seeds": [0], "validation": {"count": 5, "split_seed": 1, "seeds": [0]}}
    path = tmp_path / "r.json"
    a = accuracy.Results(path, config)
    b = accuracy.Results(path, {**config, "seeds": [1]})  # another invocation: other seeds, same protocol
    a.data["runs"]["whole|cnn|seed=0"] = {"test_acc": 0.9}
    a.save()
    b.data["runs"]["whole|cnn|seed=1"] = {"test_acc": 0.8}
    b.save()  # merges what a wrote meanwhile
    assert set(json.loads(path.read_text())["runs"]) == {"whole|cnn|seed=0", "whole|cnn|seed=1"}
    assert set(accuracy.Results(path, {**config, "seeds": [2]}).data["runs"]) == {
        "whole|cnn|seed=0",
        "whole|cnn|seed=1",
    }
    assert accuracy.Results(path, {**config, "epochs": 1}).data["runs"] == {}  # another protocol: afresh


# -- the GPU script, on CPU --------------------------------------------------------------------------------
@pytest.mark.slow
def test_cifar_models_take_32x32_and_padded_28x28_inputs() -> None:
    assert sum(p.numel() for p in accuracy_gpu.build_model("resnet18", 3, 10).parameters()) == 11_173_962
    for arch in accuracy_gpu.ARCHS:
        model = accuracy_gpu.build_model(arch, 1, 100).eval()
        with torch.no_grad():
            assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="arch must be one of"):
        accuracy_gpu.build_model("resnet50", 3, 10)


def test_augment_is_a_crop_of_the_padded_image_possibly_flipped() -> None:
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = accuracy_gpu.augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(16):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(out[i], c) for c in crops)
        flipped = any(torch.equal(out[i], c.flip(-1)) for c in crops)
        assert plain or flipped
        flips += flipped and not plain
    assert 0 < flips < 16


@pytest.mark.slow
def test_gpu_script_runs_one_step_per_arm_on_fake_cifar(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    write_cifar(tmp_path / "data", per_batch=6, num_test=10)
    out = tmp_path / "out.json"
    argv = [
        "--dataset", "cifar10", "--root", str(tmp_path / "data"), "--cache", str(tmp_path / "cache"),
        "--out", str(out), "--device", "cpu", "--archs", "resnet18", "--seeds", "0", "--ratios", "0.4",
        "--methods", "whole", "svd", "random", "mps", "--max-steps", "1", "--batch-size", "8", "--epochs", "1",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one step of ResNet18: more threads only spin on a busy machine
    try:
        accuracy_gpu.main(argv)
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    best = results["selection"]["0.4"]["best"]
    budget = results["selection"]["0.4"]["bytes_budget"]
    assert best in accuracy_gpu.CIFAR_MPS_CONFIGS
    assert len(results["select_runs"]) == len(accuracy_gpu.CIFAR_MPS_CONFIGS)
    expected = {"whole", "svd rho=0.4", "random rho=0.4", f"random bytes={budget:.3f}"}
    expected |= {f"mps {c} rho=0.4" for c in accuracy_gpu.CIFAR_MPS_CONFIGS}
    assert {key.split("|")[0] for key in results["runs"]} == expected
    for key, run in results["runs"].items():
        assert run["steps"] == 1 and run["recipe"]["batch_size"] == 8
        assert 10 * run["test_acc"] == pytest.approx(round(10 * run["test_acc"]))  # 10 test images
        assert run["recipe"]["train_images"] == results["data"][key.split("|")[0]]["train_images"]
    assert results["data"]["random rho=0.4"]["train_images"] == math.floor(0.4 * 30)
    mps = results["data"][f"mps {best} rho=0.4"]
    assert mps["bytes_ratio"] == pytest.approx(2 * mps["ratio"]) and budget == mps["bytes_ratio"]

    def boom(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(accuracy_gpu, "train_gpu", boom)
    accuracy_gpu.main(argv)  # resumes: every run is in the JSON already
    assert json.loads(out.read_text())["runs"].keys() == results["runs"].keys()
