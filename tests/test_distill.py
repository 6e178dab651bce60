"""The task-specific residual bias (mpsdata.distill): the layer, the distillation fit and its storage in core files.

Fakes are tiny: random 8x8 images for the layer and the fit, and a 40-image MPSFashionMNIST built on fake idx
files for everything that touches a core file.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import PIL.Image
import pytest
import torch
from fakes import write_mnist
from torch import nn

import mpsdata
from mpsdata import MPSDataError, distill
from mpsdata._archive import CoreFile

SHAPE = (1, 8, 8)
FORMS = [("dense", None), ("lowrank", 2)]


def make_teacher(shape=SHAPE, classes: int = 5, seed: int = 0) -> nn.Module:
    """A fixed random network with logits large enough for the temperature-4 KL to be far from zero."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 32), nn.Tanh(), nn.Linear(32, classes))
    with torch.no_grad():
        net[3].weight.mul_(30)
    return net


def fake_pair(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Originals (float in [0, 1]) and a lossy uint8 version of them."""
    g = torch.Generator().manual_seed(seed)
    originals = torch.rand(n, *SHAPE, generator=g)
    lossy = 0.6 * originals + 0.2 + 0.05 * torch.randn(n, *SHAPE, generator=g)
    return originals, torch.floor(lossy.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def full_loss(bias, compressed, teacher, targets, loss="kl") -> float:
    with torch.no_grad():
        x = bias(compressed.float() / 255, torch.arange(len(compressed)), quantize=True)
        return float(distill.distill_loss(teacher(x), targets, loss))


def randomize(bias: distill.ResidualBias, seed: int = 0) -> distill.ResidualBias:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bias.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return bias


@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A root holding a 40-image MPSFashionMNIST core file (ratio 0.4) built from fake idx files, and the
    original training images."""
    root = tmp_path_factory.mktemp("fashion")
    splits = write_mnist(root / "FashionMNIST" / "raw", num_train=40, num_test=8)
    mpsdata.MPSFashionMNIST(root, train=True, ratio=0.4)
    return root, splits["train"].images


@pytest.fixture
def fashion_copy(tiny_fashion, tmp_path: Path):
    """A private copy of the tiny root (tests write biases into its core file) and its dataset."""
    root = tmp_path / "root"
    shutil.copytree(tiny_fashion[0], root)
    return root, mpsdata.MPSFashionMNIST(root, train=True, ratio=0.4)


# ---------------------------------------------------------------------------------------------------
# The layer
@pytest.mark.parametrize(("form", "rank"), FORMS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_zero_init_is_the_identity(form, rank, dtype):
    bias = distill.ResidualBias(12, SHAPE, form=form, rank=rank, dtype=dtype, seed=3)
    _, u8 = fake_pair(5)
    idx = torch.tensor([0, 11, 4, 4, -1])
    x = u8.float() / 255
    assert torch.equal(bias(x, idx), x)
    assert torch.equal(bias(x, idx, quantize=True), x)
    assert torch.equal(bias.apply_uint8(u8, idx), u8)
    assert torch.equal(bias.values(idx), torch.zeros(5, *SHAPE))
    # Storing a zero bias keeps it zero (int8 scales of zero rows must not divide by zero).
    assert torch.equal(bias.round_to_storage_().values(idx), torch.zeros(5, *SHAPE))


@pytest.mark.parametrize(("form", "rank"), FORMS)
@pytest.mark.parametrize("sparse", [True, False])
def test_gradients_touch_only_the_indexed_rows(form, rank, sparse):
    bias = distill.ResidualBias(20, SHAPE, form=form, rank=rank, sparse=sparse)
    if form == "lowrank":
        with torch.no_grad():
            bias.u.normal_()  # with U = 0 only U receives gradients; give V some too
    before = {name: p.detach().clone() for name, p in bias.named_parameters()}
    idx = torch.tensor([5, 2, 5, 17])
    x = torch.rand(4, *SHAPE)
    (bias(x, idx) * torch.randn(4, *SHAPE)).sum().backward()
    rows = {2, 5, 17}
    for name, p in bias.named_parameters():
        grad = p.grad
        assert grad.is_sparse == sparse
        dense = grad.to_dense() if sparse else grad
        touched = set(torch.nonzero(dense.abs().sum(1)).flatten().tolist())
        assert touched == rows, name
        if sparse:
            assert set(grad.coalesce().indices().flatten().tolist()) == rows
    opt = torch.optim.SparseAdam(bias.parameters(), lr=0.1) if sparse else torch.optim.Adam(bias.parameters(), lr=0.1)
    opt.step()
    untouched = [i for i in range(20) if i not in rows]
    for name, p in bias.named_parameters():
        assert torch.equal(p.detach()[untouched], before[name][untouched]), name
        assert not torch.equal(p.detach()[sorted(rows)], before[name][sorted(rows)]), name


def test_sizes_per_sample():
    dense = distill.ResidualBias(3, (1, 28, 28))
    assert (dense.params_per_sample, dense.nbytes_per_sample, dense.ratio) == (784, 1568, 1.0)
    assert distill.ResidualBias(3, (1, 28, 28), dtype="float32").nbytes_per_sample == 3136
    low = distill.ResidualBias(3, (3, 32, 24), form="lowrank", rank=2, dtype="int8")
    assert low.params_per_sample == 3 * 2 * (32 + 24)
    assert low.nbytes_per_sample == 3 * 2 * (32 + 24) + 2 * 4  # int8 values + one float32 scale per factor
    assert low.ratio == pytest.approx(3 * 2 * 56 / (3 * 32 * 24))
    assert sum(p[0].numel() for p in low.parameters()) == low.params_per_sample


def test_apply_uint8_rounds_half_up_and_clamps():
    bias = distill.ResidualBias(3, (1, 1, 4))
    with torch.no_grad():
        bias.weight[1] = torch.tensor([0.5, -0.5, 1.5, -2.0]) / 255
    images = torch.tensor([[[[10, 10, 254, 1]]]], dtype=torch.uint8)
    out = bias.apply_uint8(images, [1])
    assert out.tolist() == [[[[11, 10, 255, 0]]]]
    # numpy in, numpy out
    assert np.array_equal(bias.apply_uint8(images.numpy(), np.array([1])), out.numpy())
    # forward with quantize serves the same values, on the [0, 1] scale
    served = bias(images.float() / 255, torch.tensor([1]), quantize=True)
    assert torch.equal(torch.round(served * 255).to(torch.uint8), out)


@pytest.mark.parametrize(("form", "rank"), FORMS)
@pytest.mark.parametrize("channels", [1, 3])
def test_apply_uint8_item_matches_the_batched_path(form, rank, channels):
    bias = randomize(distill.ResidualBias(30, (channels, 8, 6), form=form, rank=rank), seed=channels)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (30, channels, 8, 6), dtype=torch.uint8, generator=g)
    batched = bias.apply_uint8(images, torch.arange(30))
    for i in range(30):
        item = images[i, 0].numpy() if channels == 1 else images[i].permute(1, 2, 0).numpy()
        out = bias.apply_uint8_item(item, i)
        want = batched[i, 0].numpy() if channels == 1 else batched[i].permute(1, 2, 0).numpy()
        assert out.shape == item.shape and np.array_equal(out, want)
    assert np.array_equal(bias.apply_uint8_item(item, -1), bias.apply_uint8_item(item, 29))
    with pytest.raises(IndexError, match=r"index must be in \[-30, 30\), got 30"):
        bias.apply_uint8_item(item, 30)
    with pytest.raises(ValueError, match="uint8 numpy array of shape"):
        bias.apply_uint8_item(item.astype(np.float32), 0)


def test_quantized_forward_has_straight_through_gradient():
    bias = distill.ResidualBias(2, (1, 2, 2), sparse=False)
    x = torch.full((1, 1, 2, 2), 0.5)
    bias(x, [0], quantize=True).sum().backward()
    assert torch.equal(bias.weight.grad[0], torch.ones(4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"form": "svd"}, ValueError, "form must be one of"),
        ({"form": "dense", "rank": 2}, ValueError, "rank applies to form='lowrank' only"),
        ({"form": "lowrank"}, ValueError, "needs an integer rank"),
        ({"form": "lowrank", "rank": 9}, ValueError, r"rank must be between 1 and min\(H, W\) = 8"),
        ({"dtype": "bfloat16"}, ValueError, "dtype must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        distill.ResidualBias(4, SHAPE, **kwargs)
    with pytest.raises(ValueError, match=r"image_shape must be \(C, H, W\)"):
        distill.ResidualBias(4, (8, 8))
    with pytest.raises(TypeError, match="num_samples must be an int"):
        distill.ResidualBias(4.0, SHAPE)


def test_bad_images_and_indices_raise_clear_errors():
    bias = distill.ResidualBias(10, SHAPE)
    x = torch.rand(3, *SHAPE)
    with pytest.raises(TypeError, match="floating point in"):
        bias(torch.zeros(3, *SHAPE, dtype=torch.uint8), [0, 1, 2])
    with pytest.raises(ValueError, match=r"must have shape \(B, 1, 8, 8\).*got \(3, 1, 8, 7\)"):
        bias(torch.rand(3, 1, 8, 7), [0, 1, 2])
    with pytest.raises(ValueError, match="got 2 indices for a batch of 3 images"):
        bias(x, [0, 1])
    with pytest.raises(ValueError, match="indices must be 1-D"):
        bias(x, torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        bias(x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="indices must be integers"):
        bias(x, np.array([0.5, 1, 2]))
    with pytest.raises(IndexError, match=r"in \[-10, 10\).*got values in \[0, 10\]"):
        bias(x, [0, 10, 2])
    with pytest.raises(IndexError, match="got values in"):
        bias.apply_uint8(torch.zeros(3, *SHAPE, dtype=torch.uint8), [0, -11, 2])
    with pytest.raises(TypeError, match="apply_uint8 takes uint8 images"):
        bias.apply_uint8(x, [0, 1, 2])
    randomize(bias)
    assert torch.equal(bias(x, [-1, -10, 3]), bias(x, [9, 0, 3]))  # negatives count from the end


def test_distill_loss():
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    assert float(distill.distill_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    p_t = torch.softmax(t / 2, 1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / 2, 1))).sum(1).mean() * 4
    assert float(distill.distill_loss(s, t, "kl", 2.0)) == pytest.approx(float(manual), rel=1e-5)
    assert float(distill.distill_loss(s, t, "mse")) == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="loss must be one of"):
        distill.distill_loss(s, t, "ce")
    with pytest.raises(ValueError, match=r"both be \(B, K\)"):
        distill.distill_loss(s, t[:, :3])


# ---------------------------------------------------------------------------------------------------
# Fitting
@pytest.mark.parametrize(("form", "rank", "loss", "lr"), [("dense", None, "kl", 0.02), ("lowrank", 2, "mse", 0.05)])
def test_fit_lowers_the_distillation_loss(form, rank, loss, lr):
    originals, compressed = fake_pair(64)
    teacher = make_teacher()
    teacher.train()
    targets = distill.teacher_logits(teacher, originals)
    before = full_loss(distill.ResidualBias(64, SHAPE), compressed, teacher, targets, loss)
    bias = distill.fit(
        compressed, teacher, form=form, rank=rank, epochs=8, batch_size=16, lr=lr, loss=loss,
        originals=originals, progress=False,
    )  # fmt: skip
    after = full_loss(bias, compressed, teacher, targets, loss)
    assert before > 0.1
    assert after < 0.5 * before
    assert [e["epoch"] for e in bias.fit_log] == list(range(1, 9))
    # the teacher is left as it was: trainable parameters, training mode, unchanged weights
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert torch.equal(distill.teacher_logits(teacher, originals), targets)
    # the returned bias is already at its storage precision (float16): rounding again changes nothing
    snapshot = [p.detach().clone() for p in bias.parameters()]
    bias.round_to_storage_()
    assert all(torch.equal(a, b) for a, b in zip(snapshot, bias.parameters()))


def test_teacher_outputs_are_computed_once_and_stored(tmp_path):
    originals, compressed = fake_pair(32)
    teacher = make_teacher()
    path = tmp_path / "logits.pt"
    first = distill.fit(compressed, teacher, epochs=1, teacher_outputs=path, originals=originals, progress=False)
    assert path.is_file()
    assert torch.equal(torch.load(path, weights_only=True)["logits"], distill.teacher_logits(teacher, originals))
    # afterwards the originals are not needed: the same fit again gives the same bias
    second = distill.fit(compressed, teacher, epochs=1, teacher_outputs=path, progress=False)
    assert torch.equal(first.weight, second.weight)
    with pytest.raises(ValueError, match="give teacher_outputs .* or originals"):
        distill.fit(compressed, teacher, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"teacher outputs must be floating point \(N, K\) with N = 32"):
        distill.fit(compressed, teacher, epochs=1, teacher_outputs=torch.zeros(31, 5), progress=False)


class Interrupting(nn.Module):
    """Wraps a network and raises on its ``stop``-th call, as an interrupted job would stop."""

    def __init__(self, net: nn.Module, stop: int) -> None:
        super().__init__()
        self.net, self.calls, self.stop = net, 0, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.net(x)


def test_teacher_logits_from_a_dataset_of_pil_images():
    originals, _ = fake_pair(10)
    u8 = torch.floor(originals * 255 + 0.5).to(torch.uint8)
    items = [(PIL.Image.fromarray(u8[i, 0].numpy()), i % 3) for i in range(10)]  # torchvision-style items
    teacher = make_teacher()
    expected = distill.teacher_logits(teacher, u8)
    # Same inputs; only the batching differs, and conv kernels may sum in another order per batch size.
    torch.testing.assert_close(distill.teacher_logits(teacher, items, batch_size=4), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(distill.teacher_logits(teacher, u8[:, 0].numpy()), expected)  # (N, H, W) arrays too


def test_fit_resumes_from_a_checkpoint_exactly(tmp_path):
    originals, compressed = fake_pair(48)
    teacher = make_teacher()
    targets = distill.teacher_logits(teacher, originals)
    kwargs = {"form": "lowrank", "rank": 1, "batch_size": 16, "lr": 0.05, "teacher_outputs": targets, "seed": 4}
    straight = distill.fit(compressed, teacher, epochs=3, progress=False, **kwargs)
    ckpt = tmp_path / "bias.ckpt"
    with pytest.raises(KeyboardInterrupt):  # stops in the second epoch (3 batches per epoch)
        distill.fit(compressed, Interrupting(teacher, stop=5), epochs=3, checkpoint=ckpt, progress=False, **kwargs)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    resumed = distill.fit(compressed, teacher, epochs=3, checkpoint=ckpt, progress=False, **kwargs)
    assert torch.equal(straight.u, resumed.u) and torch.equal(straight.v, resumed.v)
    assert [e["loss"] for e in straight.fit_log] == pytest.approx([e["loss"] for e in resumed.fit_log])
    with pytest.raises(ValueError, match="was written by another fit"):
        distill.fit(compressed, teacher, epochs=3, checkpoint=ckpt, progress=False, **{**kwargs, "lr": 0.1})


def test_fit_rejects_mismatched_inputs(fashion_copy):
    originals, compressed = fake_pair(16)
    teacher = make_teacher()
    with pytest.raises(ValueError, match="the bias holds 10 samples"):
        distill.fit(compressed, teacher, bias=distill.ResidualBias(10, SHAPE), originals=originals, progress=False)
    with pytest.raises(TypeError, match="dataset must be an MPS dataset"):
        distill.fit([1, 2, 3], teacher, originals=originals, progress=False)
    with pytest.raises(ValueError, match="loss must be one of"):
        distill.fit(compressed, teacher, loss="ce", originals=originals, progress=False)
    with pytest.raises(ValueError, match="schedule must be"):
        distill.fit(compressed, teacher, schedule="step", originals=originals, progress=False)
    with pytest.raises(ValueError, match="optimizer must be"):
        distill.fit(compressed, teacher, optimizer="lbfgs", originals=originals, progress=False)
    _, ds = fashion_copy
    with pytest.raises(ValueError, match="originals must be the original images"):
        distill.fit(ds, make_teacher((1, 28, 28)), originals=ds, progress=False)
    targets = distill.teacher_logits(teacher, originals)
    with pytest.raises(ValueError, match="temperature must be positive"):
        distill.fit(compressed, teacher, temperature=0.0, epochs=0, teacher_outputs=targets, progress=False)
    with pytest.raises(ValueError, match="NaN or infinite"):
        distill.fit(compressed, teacher, teacher_outputs=targets.index_fill(0, torch.tensor([3]), float("nan")),
                    progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*divide 0..255 images by 255"):
        distill.fit(compressed.float(), teacher, teacher_outputs=targets, progress=False)  # 0..255 floats
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        distill.teacher_logits(teacher, originals, batch_size=0)


def test_teacher_outputs_with_a_graph_or_in_a_foreign_file(tmp_path):
    """Outputs that still carry the teacher's autograd graph are constants to the fit (they crashed its second
    step), and a file that fit did not write is named as such."""
    originals, compressed = fake_pair(32)
    teacher = make_teacher()
    with_graph = teacher(originals)
    assert with_graph.requires_grad
    bias = distill.fit(compressed, teacher, teacher_outputs=with_graph, epochs=1, batch_size=8, progress=False)
    expected = distill.fit(
        compressed, teacher, teacher_outputs=with_graph.detach(), epochs=1, batch_size=8, progress=False
    )
    assert torch.equal(bias.weight, expected.weight)
    foreign = tmp_path / "logits.pt"
    torch.save(with_graph.detach(), foreign)
    with pytest.raises(ValueError, match="not a teacher-outputs file written by fit"):
        distill.fit(compressed, teacher, teacher_outputs=foreign, progress=False)


@pytest.mark.parametrize(("form", "rank"), [("dense", None), ("lowrank", 2)])
def test_adam_moves_only_the_batch_rows_of_a_dense_bias(form, rank):
    """fit's "adam" updates only the batch's rows whether the bias's gradients are sparse or dense: both fits are
    the same bits. (Dense Adam's momentum moved every visited row on every step.)"""
    originals, compressed = fake_pair(48)
    teacher = make_teacher()
    targets = distill.teacher_logits(teacher, originals)
    fits = [
        distill.fit(
            compressed,
            teacher,
            bias=distill.ResidualBias(48, SHAPE, form=form, rank=rank, sparse=sparse),
            epochs=2,
            batch_size=16,
            teacher_outputs=targets,
            progress=False,
        )  # fmt: skip
        for sparse in (True, False)
    ]
    for a, b in zip(*(f.parameters() for f in fits)):
        assert torch.equal(a, b)


def test_fit_on_an_mps_dataset_then_save_and_load(fashion_copy, tiny_fashion):
    root, ds = fashion_copy
    raw = torch.from_numpy(tiny_fashion[1])  # the fake originals (N, 28, 28) uint8, in order
    teacher = make_teacher((1, 28, 28), classes=10)
    targets = distill.teacher_logits(teacher, raw)
    compressed = ds.decode_batch(np.arange(len(ds)))
    before = full_loss(distill.ResidualBias(len(ds), (1, 28, 28)), compressed, teacher, targets)
    bias = distill.fit(ds, teacher, epochs=6, batch_size=8, lr=0.002, originals=raw, progress=False)
    assert full_loss(bias, compressed, teacher, targets) < 0.5 * before

    distill.save_bias(bias, ds.archive)
    loaded = distill.load_bias(ds.archive)
    assert loaded is not None and loaded.config == bias.config
    idx = torch.arange(len(ds))
    assert torch.equal(loaded.values(idx), bias.values(idx))
    assert torch.equal(loaded.apply_uint8(compressed, idx), bias.apply_uint8(compressed, idx))
    assert loaded.meta["loss"] == "kl" and loaded.meta["epochs"] == 6
    # the cores are untouched: every checksum holds and a reopened dataset decodes the same images
    CoreFile(ds.archive).verify()
    again = mpsdata.MPSFashionMNIST(root, train=True, ratio=0.4)
    assert torch.equal(again.decode_batch(np.arange(len(ds))), compressed)


# ---------------------------------------------------------------------------------------------------
# Storage in core files
@pytest.mark.parametrize(("form", "rank"), FORMS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_save_load_round_trip(fashion_copy, form, rank, dtype):
    _, ds = fashion_copy
    bias = randomize(distill.ResidualBias(len(ds), (1, 28, 28), form=form, rank=rank, dtype=dtype))
    exact = [p.detach().clone() for p in bias.parameters()]
    bias.round_to_storage_()
    rounded = [p.detach().clone() for p in bias.parameters()]
    if dtype != "float32":
        assert any(not torch.equal(a, b) for a, b in zip(exact, rounded))
    tolerance = {"float16": 1e-3, "float32": 0.0, "int8": 1 / 127}[dtype]
    for a, b in zip(exact, rounded):  # relative to each sample's largest value
        assert float(((a - b).abs().amax(1) / a.abs().amax(1)).max()) <= tolerance
    distill.save_bias(bias, ds.archive, meta={"note": "round trip"})
    loaded = distill.load_bias(ds.archive)
    assert loaded is not None
    assert all(torch.equal(a, b) for a, b in zip(rounded, loaded.parameters()))
    assert loaded.meta == {"note": "round trip"}
    with h5py.File(ds.archive, "r") as f:
        group = f["bias"]
        assert (group.attrs["form"], group.attrs["dtype"], int(group.attrs["rank"])) == (form, dtype, rank or 0)
        assert list(group.attrs["shape"]) == [len(ds), 1, 28, 28]
        stored = {name: group[name].dtype for name in group}
    assert all(str(v) == dtype for k, v in stored.items() if not k.endswith("_scale"))


def test_saving_again_replaces_and_remove_restores(fashion_copy):
    _, ds = fashion_copy
    path = ds.archive
    size0 = path.stat().st_size
    with h5py.File(path, "r") as f:
        content = f.attrs["content_sha256"]
    dense = randomize(distill.ResidualBias(len(ds), (1, 28, 28)))
    distill.save_bias(dense, path)
    size_dense = path.stat().st_size
    low = randomize(distill.ResidualBias(len(ds), (1, 28, 28), form="lowrank", rank=1, dtype="int8"))
    distill.save_bias(low, path)
    size_low = path.stat().st_size
    assert size0 < size_low < size_dense  # the dense group is gone, not left as free space in the file
    assert distill.load_bias(path).form == "lowrank"
    assert distill.remove_bias(path) is True
    assert distill.load_bias(path) is None
    assert distill.remove_bias(path) is False
    assert path.stat().st_size <= size0 + 4096
    with h5py.File(path, "r") as f:
        assert f.attrs["content_sha256"] == content
    CoreFile(path).verify()
    assert not list(path.parent.glob(".*tmp*"))  # no temporary file left behind


def test_dataset_budget_includes_the_bias_only_when_served(fashion_copy):
    root, ds = fashion_copy
    raw = len(ds) * 28 * 28
    plain_ratio, plain_bytes = ds.ratio, ds.bytes_ratio
    assert plain_bytes == pytest.approx(ds.archive.stat().st_size / raw)
    assert distill.bias_info(ds.archive) is None
    with pytest.raises(mpsdata.MPSDataError, match="no residual bias"):
        mpsdata.MPSFashionMNIST(root, train=True, ratio=0.4, bias=True)
    bias = randomize(distill.ResidualBias(len(ds), (1, 28, 28), form="lowrank", rank=2))
    distill.save_bias(bias, ds.archive)
    assert bias.ratio == pytest.approx(2 * 56 / 784)
    served = mpsdata.MPSFashionMNIST(root, train=True, ratio=0.4, bias=True)
    assert served.ratio == pytest.approx(plain_ratio + bias.ratio)
    stored = len(ds) * bias.nbytes_per_sample
    extra = (served.bytes_ratio - plain_bytes) * raw
    assert stored <= extra <= stored + 16384  # the bias's bytes plus HDF5 bookkeeping
    unserved = mpsdata.MPSFashionMNIST(root, train=True, ratio=0.4)
    assert unserved.ratio == pytest.approx(plain_ratio)
    assert unserved.bytes_ratio == pytest.approx(plain_bytes)
    info = distill.bias_info(ds.archive)
    assert (info["params_per_sample"], info["nbytes_per_sample"]) == (112, 224)
    # served items and batches carry the bias; asking for the plain images still works
    index = np.arange(5)
    stored_bias = distill.load_bias(ds.archive)  # rounded to its storage precision
    assert torch.equal(
        served.decode_batch(index), stored_bias.apply_uint8(unserved.decode_batch(index), torch.from_numpy(index))
    )
    assert torch.equal(served.decode_batch(index, bias=False), unserved.decode_batch(index))
    assert np.array_equal(np.asarray(served[3][0]), served.decode_batch([3])[0, 0].numpy())
    # .data is what the dataset serves: with the bias when opened with it
    assert torch.equal(served.data, served.decode_batch(np.arange(len(ds)))[:, 0])
    assert torch.equal(unserved.data, unserved.decode_batch(np.arange(len(ds)))[:, 0])
    assert not torch.equal(served.data, unserved.data)


def test_bias_chunks_waste_little_space(fashion_copy, monkeypatch):
    _, ds = fashion_copy
    bias = randomize(distill.ResidualBias(len(ds), (1, 28, 28)))
    monkeypatch.setattr(distill, "_CHUNK_BYTES", 16 * bias.nbytes_per_sample)  # 40 samples in chunks of <= 16
    size0 = ds.archive.stat().st_size
    distill.save_bias(bias, ds.archive)
    with h5py.File(ds.archive, "r") as f:
        chunk = f["bias/weight"].chunks[0]
    assert chunk <= 16 and math.ceil(40 / chunk) * chunk <= 42  # three chunks of 14, not 16 + 16 + a mostly empty 16
    stored = len(ds) * bias.nbytes_per_sample
    assert ds.archive.stat().st_size - size0 <= stored * 1.05 + 16384  # + headers, index and attributes


def test_storage_errors(fashion_copy, tmp_path):
    _, ds = fashion_copy
    with pytest.raises(ValueError, match="the bias holds 39 samples .* holds 40"):
        distill.save_bias(distill.ResidualBias(39, (1, 28, 28)), ds.archive)
    with pytest.raises(ValueError, match=r"of shape \(1, 28, 27\)"):
        distill.save_bias(distill.ResidualBias(40, (1, 28, 27)), ds.archive)
    with pytest.raises(TypeError, match="bias must be a ResidualBias"):
        distill.save_bias(torch.zeros(3), ds.archive)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(MPSDataError, match="not an mpsdata core file"):
        distill.load_bias(other)
    with pytest.raises(MPSDataError, match="cannot open core file"):
        distill.load_bias(tmp_path / "missing.h5")


def test_corrupted_or_foreign_bias_is_refused(fashion_copy):
    _, ds = fashion_copy
    distill.save_bias(randomize(distill.ResidualBias(len(ds), (1, 28, 28))), ds.archive)
    with h5py.File(ds.archive, "r+") as f:
        f["bias/weight"][3, 0, 0, 0] += 1
    with pytest.raises(MPSDataError, match="fails its checksum"):
        distill.load_bias(ds.archive)
    distill.save_bias(randomize(distill.ResidualBias(len(ds), (1, 28, 28))), ds.archive)
    with h5py.File(ds.archive, "r+") as f:
        f["bias"].attrs["cores_sha256"] = "0" * 64
    with pytest.raises(MPSDataError, match="learned on other cores"):
        distill.load_bias(ds.archive)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("sparse", [True, False])
def test_fit_on_cuda(sparse):
    originals, compressed = fake_pair(64)
    teacher = make_teacher().cuda()
    targets = distill.teacher_logits(teacher, originals)
    bias = distill.ResidualBias(64, SHAPE, sparse=sparse)
    before = full_loss(bias.cuda(), compressed.cuda(), teacher, targets.cuda())
    fitted = distill.fit(compressed, teacher, bias=bias, epochs=6, batch_size=16, lr=0.02, teacher_outputs=targets,
                         progress=False)  # fmt: skip
    assert fitted.weight.is_cuda
    assert full_loss(fitted, compressed.cuda(), teacher, targets.cuda()) < 0.5 * before
