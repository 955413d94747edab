"""The segmentation core: schedule and sampler, sliding windows, summaries, config checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from medidiff.seg.config import SegmenterConfig
from medidiff.seg.diffusion import alpha_bar, one_hot_map, sample_label_map, segmentation_loss, time_grid
from medidiff.seg.inference import predict_probabilities, summarize, window_logits
from medidiff.seg.nets import build_segmenter

LABELS = [{"value": 0, "name": "background"}, {"value": 1, "name": "a"}, {"value": 2, "name": "b"}]


def _cfg(**kw) -> SegmenterConfig:
    base = {"arch": "diffusion", "labels": LABELS, "patch_size": (16, 16, 16), "channels": (8, 16),
            "norm_num_groups": 4, "sample_steps": 2, "samples": 3, "overlap": 0.5}  # fmt: skip
    return SegmenterConfig.model_validate({**base, **kw})


def _trained_like(cfg: SegmenterConfig) -> nn.Module:
    """The network with every weight jittered: MONAI zero-initialises the diffusion UNet's last
    convolution, so an untrained one ignores its input."""
    net = build_segmenter(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def test_schedule_is_fp32_or_wider_and_decreasing() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ab = alpha_bar(torch.linspace(0, 1, 11, dtype=dtype))
        assert ab.dtype in (torch.float32, torch.float64)
    ab = alpha_bar(time_grid(8))
    assert ab.dtype == torch.float64 and bool((ab[1:] > ab[:-1]).all())  # times run from 1 towards 0
    assert (
        float(alpha_bar(torch.tensor(0.0))) == pytest.approx(1.0)
        and float(alpha_bar(torch.tensor(1.0))) < 1e-6
    )


def test_one_hot_map_refuses_interpolated_labels() -> None:
    idx = torch.tensor([[[[0, 1], [2, 1]]]])
    oh = one_hot_map(idx, 3)
    assert oh.shape == (1, 3, 2, 2) and set(oh.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(((oh + 1) / 2).argmax(1, keepdim=True), idx)
    with pytest.raises(TypeError, match="integer class indices"):
        one_hot_map(idx.float() * 0.5, 3)


def test_loss_is_finite_and_depends_on_the_generator() -> None:
    cfg = _cfg()
    net = _trained_like(cfg)
    image = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    idx = (image * 3).long().clamp(max=2)
    a = segmentation_loss(net, image, idx, 3, diffusion=True, generator=torch.Generator().manual_seed(1))
    b = segmentation_loss(net, image, idx, 3, diffusion=True, generator=torch.Generator().manual_seed(1))
    c = segmentation_loss(net, image, idx, 3, diffusion=True, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(a) and a.item() == b.item() and a.item() != c.item()


def test_sampler_is_seeded_per_sample() -> None:
    """A sample depends on its own generator only: drawn alone or beside others, it is the same."""
    cfg = _cfg()
    net = _trained_like(cfg)
    image = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    fn = window_logits(net, cfg, whole_grid=True)

    def draw(seeds: list[int]) -> torch.Tensor:
        with torch.no_grad():
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            return sample_label_map(fn, image, 3, steps=3, generators=gens)

    both = draw([5, 7])
    assert torch.equal(both[1], draw([7])[0]) and torch.equal(both[0], draw([5])[0])
    assert not torch.equal(both[0], both[1])
    assert torch.allclose(both.sum(1), torch.ones(1), atol=1e-5)
    p1 = predict_probabilities(net, cfg, image, seed=3)
    p2 = predict_probabilities(net, cfg, image, seed=3)
    p3 = predict_probabilities(net, cfg, image, seed=4)
    assert p1.shape == (3, 3, 16, 16, 16) and torch.equal(p1, p2) and not torch.equal(p1, p3)


@pytest.mark.parametrize(("eta", "map_scale"), [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.0, 0.3), (1.0, 0.1)])
def test_ddim_steps_keep_the_forward_marginals(eta: float, map_scale: float) -> None:
    """With a network that knows the clean map, every DDIM step of any eta lands on the forward process's
    marginal: with the clean map ``x0 = b (2 onehot - 1)`` (b = ``map_scale``), x_t - sqrt(abar(t)) x0
    has mean 0 and variance 1 - abar(t) at every step. 12,288 values per step: the variance's standard
    error is about 1.3% of it (tolerance 6%), the mean's about 0.009 sqrt(1 - abar) (tolerance 0.05, over
    5 of them). A sampler that forgot b would leave sqrt(abar) (1 - b) (2 onehot - 1) in the residual: a
    variance off by up to 800% at the last step."""
    x0 = map_scale * one_hot_map(torch.zeros(1, 1, 16, 16, 16, dtype=torch.long), 3)
    seen: list[tuple[float, torch.Tensor]] = []

    def fn(image: torch.Tensor, x_t: torch.Tensor | None, t: float | None) -> torch.Tensor:
        seen.append((float(t), x_t.clone()))
        return 50.0 * x0 / map_scale  # softmax: the clean one-hot map, to float precision

    image = torch.zeros(1, 1, 16, 16, 16)
    out = sample_label_map(
        fn, image, 3, steps=5, generators=[torch.Generator().manual_seed(0)], eta=eta, map_scale=map_scale
    )
    assert torch.allclose(out[0], (x0 / map_scale + 1) / 2, atol=1e-6)
    for t, x in seen:
        ab = float(alpha_bar(torch.tensor(t, dtype=torch.float64)))
        resid = (x - ab**0.5 * x0).double()
        assert abs(float(resid.var()) / (1 - ab) - 1) < 0.06, (eta, t, float(resid.var()), 1 - ab)
        assert abs(float(resid.mean())) < 0.05 * (1 - ab) ** 0.5, (eta, t, float(resid.mean()))


@pytest.mark.parametrize("map_scale", [1.0, 0.3])
def test_training_noises_the_scaled_map(map_scale: float) -> None:
    """The training loss shows the network x_t = sqrt(abar) b (2 onehot - 1) + sqrt(1 - abar) eps: its
    residual after the scaled clean map is standard normal (8,192 x 3 values per item: the variance's
    standard error is 0.9%, tolerance 5%; the mean's 0.006, tolerance 0.03). An unscaled map would leave
    sqrt(abar) (1 - b) in it; the test keeps the items where that would show (abar > 0.1)."""
    idx = (torch.rand(6, 1, 16, 16, 32, generator=torch.Generator().manual_seed(0)) * 3).long()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def net(image: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append((x_t.clone(), t.clone()))
        return torch.zeros_like(x_t, requires_grad=True)

    loss = segmentation_loss(net, torch.zeros(6, 1, 16, 16, 32), idx, 3, diffusion=True,
                             generator=torch.Generator().manual_seed(3), map_scale=map_scale)  # fmt: skip
    assert torch.isfinite(loss)
    (x_t, t), x0 = seen[0], map_scale * one_hot_map(idx, 3)
    ab = alpha_bar(t)
    kept = 0
    for i in range(6):
        if float(ab[i]) <= 0.1:
            continue
        resid = (x_t[i] - float(ab[i]) ** 0.5 * x0[i]) / float(1 - ab[i]) ** 0.5
        assert abs(float(resid.var()) - 1) < 0.05 and abs(float(resid.mean())) < 0.03, (i, float(t[i]))
        kept += 1
    assert kept >= 3  # the seed gives enough informative times to test


def test_eta_and_step_fusion() -> None:
    """eta 0 is deterministic given the start; eta > 0 draws more noise from the sample's own generator
    (seeded); fuse="steps" is the mean of the steps' predictions; bad values are refused."""
    cfg = _cfg()
    net = _trained_like(cfg)
    image = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    fn = window_logits(net, cfg, whole_grid=True)

    def draw(**kw: object) -> torch.Tensor:
        with torch.no_grad():
            return sample_label_map(
                fn, image, 3, steps=3, generators=[torch.Generator().manual_seed(5)], **kw
            )

    a0, a1, b1 = draw(), draw(eta=1.0), draw(eta=1.0)
    assert torch.equal(a1, b1) and not torch.equal(a0, a1)
    preds: list[torch.Tensor] = []

    def recording(image: torch.Tensor, x_t: torch.Tensor | None, t: float | None) -> torch.Tensor:
        logits = fn(image, x_t, t)
        preds.append(torch.softmax(logits.float(), 1))
        return logits

    with torch.no_grad():
        fused = sample_label_map(recording, image, 3, steps=3, generators=[torch.Generator().manual_seed(5)],
                                 fuse="steps")  # fmt: skip
    assert len(preds) == 3 and torch.allclose(fused[0], torch.stack(preds).mean(0)[0], atol=1e-6)
    assert torch.equal(preds[-1], a0)  # fusion changes what is returned, not the path
    for kw, msg in (
        ({"eta": 1.5}, "eta must lie"),
        ({"fuse": "mean"}, "fuse must be one of"),
        ({"map_scale": 0.0}, "map_scale must lie"),
    ):
        with pytest.raises(ValueError, match=msg):
            draw(**kw)
    cfg_steps = cfg.model_copy(update={"fuse": "steps", "sample_eta": 1.0})
    p_cfg = predict_probabilities(net, cfg_steps, image, seed=3, samples=2)
    p_arg = predict_probabilities(net, cfg, image, seed=3, samples=2, eta=1.0, fuse="steps")
    assert torch.equal(p_cfg, p_arg)


class _Pointwise(nn.Module):
    """A 1x1x1 network: its output at a voxel depends on that voxel only, so any correct tiling of
    windows reproduces the whole-grid output exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 3, 1)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, image: torch.Tensor, x_t: torch.Tensor | None = None, t: torch.Tensor | None = None):
        return self.conv(torch.cat([image, x_t], 1)) * (1 + t.view(-1, 1, 1, 1, 1))


@pytest.mark.parametrize("shape", [(40, 37, 23), (12, 20, 16)])
def test_sliding_windows_place_and_blend_exactly(shape: tuple[int, ...]) -> None:
    """Windows (larger and smaller than the volume, odd sizes, 50% overlap) reassemble the whole-grid
    output: a misplaced or mis-weighted window would show."""
    cfg = _cfg()
    net = _Pointwise().eval()
    g = torch.Generator().manual_seed(1)
    image, x_t = torch.randn(1, 1, *shape, generator=g), torch.randn(1, 3, *shape, generator=g)
    with torch.no_grad():
        tiled = window_logits(net, cfg)(image, x_t, 0.3)
        whole = window_logits(net, cfg, whole_grid=True)(image, x_t, 0.3)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


def test_summarize_by_hand() -> None:
    # 3 samples, 2 classes, 2 voxels: voxel 0 certain class 1; voxel 1 split 2 : 1
    p = np.zeros((3, 2, 1, 1, 2))
    p[:, 1, 0, 0, 0] = 1.0
    p[:, 0, 0, 0, 1] = [0.9, 0.8, 0.2]
    p[:, 1, 0, 0, 1] = [0.1, 0.2, 0.8]
    s = summarize(p)
    assert s.index.ravel().tolist() == [1, 0]
    assert s.disagreement.ravel().tolist() == pytest.approx([0.0, 1 / 3])
    m = 0.9 + 0.8 + 0.2
    h = -((m / 3) * np.log(m / 3) + (1 - m / 3) * np.log(1 - m / 3)) / np.log(2)
    assert s.entropy.ravel().tolist() == pytest.approx([0.0, h], abs=1e-6)
    assert s.counts.tolist() == [[1, 1], [1, 1], [0, 2]]


def test_config_refuses_bad_tables_and_shapes() -> None:
    with pytest.raises(ValueError, match="background"):
        _cfg(labels=[{"value": 1, "name": "a"}, {"value": 0, "name": "b"}])
    with pytest.raises(ValueError, match="distinct"):
        _cfg(labels=[{"value": 0, "name": "a"}, {"value": 1, "name": "b"}, {"value": 1, "name": "c"}])
    with pytest.raises(ValueError, match="multiple of 2"):
        _cfg(patch_size=(15, 16, 16))
    with pytest.raises(ValueError, match="at least 3 levels"):
        _cfg(arch="dynunet", channels=(8, 16))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="map_scale"):
            _cfg(map_scale=bad)
    assert _cfg().map_scale == 1.0  # checkpoints saved before map_scale existed keep their meaning


def test_refuses_nan_images() -> None:
    cfg = _cfg()
    net = build_segmenter(cfg, seed=0).eval()
    image = torch.zeros(1, 1, 16, 16, 16)
    image[0, 0, 3, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        predict_probabilities(net, cfg, image)


def test_dynunet_is_deterministic_and_one_sample() -> None:
    cfg = _cfg(arch="dynunet", channels=(8, 16, 32))
    net = build_segmenter(cfg, seed=0).eval()
    image = torch.rand(1, 1, 20, 16, 24, generator=torch.Generator().manual_seed(0))
    a, b = predict_probabilities(net, cfg, image, seed=0), predict_probabilities(net, cfg, image, seed=9)
    assert a.shape == (1, 3, 20, 16, 24) and torch.equal(a, b)


def test_error_auroc_by_hand() -> None:
    from medidiff.seg.metrics import error_auroc

    u = np.array([0.9, 0.1, 0.5, 0.2, 0.5])
    wrong = np.array([True, False, True, False, False])
    # wrong scores {0.9, 0.5} against right {0.1, 0.2, 0.5}: pairs won 3 + 2 + 0.5 tie = 5.5 of 6
    assert error_auroc(u, wrong) == pytest.approx(5.5 / 6)
    assert np.isnan(error_auroc(u, np.zeros(5, bool)))


def test_segmentation_metrics_against_known_overlaps() -> None:
    from medidiff.seg.metrics import segmentation_metrics

    truth = np.zeros((12, 12, 12), np.int64)
    truth[2:8, 2:8, 2:8] = 1
    pred = np.zeros_like(truth)
    pred[2:8, 2:8, 3:9] = 1  # shifted by one voxel along the last axis (2 mm there)
    probs = np.stack([pred == 0, pred == 1]).astype(np.float32)
    m = segmentation_metrics(
        pred, truth, probs, (pred != truth).astype(float), spacing=(1, 1, 2), names=["bg", "x"]
    )
    assert m["dice"]["x"] == pytest.approx(2 * 180 / 432)
    assert m["hd95_mm"]["x"] == pytest.approx(2.0)
    assert m["error_auroc"] == pytest.approx(1.0)
    # confident and wrong on 72 of 1728 voxels: ECE over two classes = 72/1728 each
    assert m["calibration_error"] == pytest.approx(72 / 1728, rel=1e-4)


def test_self_conditioning_feeds_the_previous_estimate_in_sampling() -> None:
    """With self_condition each step sees [x_t, x0_prev]: zeros at the first step, then the scaled estimate
    of the step before (b (2 p - 1) of its softmax); without it, x_t alone."""
    b, seen = 0.3, []
    weights = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1, 1)

    def raw(image: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        return image * weights + 0.1 * x_in[:, :3]  # depends on the map: each step's estimate differs

    def logits(image: torch.Tensor, x_in: torch.Tensor, t: float) -> torch.Tensor:
        seen.append(x_in.clone())
        return raw(image, x_in)

    image = torch.rand(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sample_label_map(logits, image, 3, steps=3, generators=[torch.Generator().manual_seed(1)], eta=1.0,
                     map_scale=b, self_condition=True)  # fmt: skip
    assert [s.shape[1] for s in seen] == [6, 6, 6]
    assert torch.equal(seen[0][:, 3:], torch.zeros_like(seen[0][:, 3:]))
    for before, now in itertools.pairwise(seen):
        p = torch.softmax(raw(image, before).float(), dim=1)
        torch.testing.assert_close(now[:, 3:], b * (2 * p - 1))
    seen.clear()
    sample_label_map(logits, image, 3, steps=2, generators=[torch.Generator().manual_seed(1)], map_scale=b)
    assert [s.shape[1] for s in seen] == [3, 3]


def test_self_conditioning_in_training_gives_half_the_items_a_first_pass() -> None:
    """Training with self_condition calls the network twice: a first pass without gradient on a random
    subset, whose scaled estimate those items then see beside x_t; the other items see zeros. The
    network's input has 2C map channels and its weights get gradients from the second pass."""
    cfg = _cfg(self_condition=True)
    net = _trained_like(cfg).train()
    calls: list[tuple[torch.Tensor, bool]] = []
    hook = net.register_forward_hook(
        lambda m, inp, out: calls.append((inp[1].detach().clone(), torch.is_grad_enabled()))
    )
    idx = (torch.rand(8, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) * 3).long()
    image = torch.rand(8, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    loss = segmentation_loss(net, image, idx, 3, diffusion=True, generator=torch.Generator().manual_seed(2),
                             map_scale=0.5, self_condition=True)  # fmt: skip
    hook.remove()
    loss.backward()
    (first, first_grad), (second, second_grad) = calls
    assert not first_grad and second_grad and first.shape[1] == 6 and second.shape[1] == 6
    assert 0 < first.shape[0] < 8  # a random part of the batch (this seed: neither none nor all)
    assert torch.equal(first[:, 3:], torch.zeros_like(first[:, 3:]))
    prev = second[:, 3:]
    fed = prev.flatten(1).abs().amax(1) > 0
    assert int(fed.sum()) == first.shape[0] and float(prev.abs().max()) <= 0.5 + 1e-6
    torch.testing.assert_close(second[fed, :3], first[:, :3])  # the same x_t in both passes
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="self_condition"):
        _cfg(arch="dynunet", channels=(8, 16, 32), self_condition=True)
