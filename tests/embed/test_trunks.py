"""The backbone protocol: a toy trunk registered in a test trains and embeds through the library;
partial fine-tuning's cached maps equal the trunk's own forward up to that block, and the forward
from them equals the full forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segsort_unsup.embed.backbones import BACKBONES, build_backbone, register_backbone
from segsort_unsup.embed.stage import embed_image
from segsort_unsup.embed.model import build_model, load_model
from segsort_unsup.embed.trunk import Backbone, FeatureLayer, InputConvention, Trunk
from segsort_unsup.errors import InputError
from tests.embed.train_data import make_segments


class ToyTrunk(Trunk):
    """Two blocks: an 8x8 stride-8 conv (3 -> 8) + ReLU, then a 3x3 conv (8 -> 16) + ReLU."""

    def __init__(self, feature_layer: str = "mix"):
        super().__init__(InputConvention(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), scale=1.0))
        self.name = "toy"
        self.stem = nn.Conv2d(3, 8, 8, stride=8)
        self.mix = nn.Conv2d(8, 16, 3, padding=1)
        self.block_names = ("stem", "mix")
        self.block_inputs = (FeatureLayer("image", 3, 1), FeatureLayer("stem", 8, 8))
        self.output = FeatureLayer(feature_layer, 16, 8)

    def run_block(self, index, x):
        if index == 0:
            return F.relu(self.stem(F.pad(x, (0, -x.shape[-1] % 8, 0, -x.shape[-2] % 8))))
        return F.relu(self.mix(x))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(BACKBONES, "toy", None)  # removed again after the test
    return register_backbone(Backbone("toy", "a two-block test trunk", lambda **kw: ToyTrunk(kw["feature_layer"]),
                                      ("mix",), "none"))


def _reference_toy(trunk: ToyTrunk, rgb: torch.Tensor) -> torch.Tensor:
    x = (rgb / 255 - 0.5) / 0.25
    x = F.pad(x, (0, -x.shape[-1] % 8, 0, -x.shape[-2] % 8))
    return F.relu(F.conv2d(F.relu(F.conv2d(x, trunk.stem.weight, trunk.stem.bias, stride=8)),
                           trunk.mix.weight, trunk.mix.bias, padding=1))


def test_toy_backbone_builds_from_the_registry(toy):
    model = build_model({"backbone": "toy", "embedding_dim": 4, "hidden": 8})
    trunk = model.backbone
    rgb = torch.rand(2, 3, 30, 41) * 255
    with torch.no_grad():
        torch.testing.assert_close(trunk(rgb), _reference_toy(trunk, rgb))
    assert model.model_config()["backbone"] == "toy" and model.stride == 8
    with pytest.raises(InputError, match="not one of mix"):
        build_model({"backbone": "toy", "feature_layer": "conv4_3"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bsds):
    root = tmp_path_factory.mktemp("toy_train")
    store, images = make_segments(bsds, root, ids=("100007", "100039"))
    return {"store": store, "images": images}


@pytest.mark.parametrize("mode", ["full", "cached"])
def test_toy_backbone_trains_and_embeds(toy, tiny, tmp_path, mode):
    from segsort_unsup.train.stage import TrainConfig, run
    from segsort_unsup.io.images import read_image

    config = TrainConfig(backbone="toy", feature_layer="mix", mode=mode, steps=3, batch_size=2, crop=64,
                         feature_scales=(1.0,), log_every=1, checkpoint_every=3, threads=1, workers=0,
                         head="conv1", hidden=8, embedding_dim=4, images=str(tiny["images"]))
    summary = run(config, tiny["store"], tmp_path / "run")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary.ok and summary.done == 3 and len(losses) == 3 and np.isfinite(losses).all()
    model, _ = load_model(tmp_path / "run" / "model.pt")
    assert model.model_config()["backbone"] == "toy"
    assert model.model_config()["freeze_blocks"] == (2 if mode == "cached" else 0)
    rgb = read_image(next(tiny["images"].iterdir()))
    emb = embed_image(model, rgb)
    assert emb.shape == (4, *rgb.shape[:2])
    torch.testing.assert_close(emb.norm(dim=0), torch.ones(rgb.shape[:2]))


def test_train_blocks_freezes_below_and_gradients_reach_above(toy):
    model = build_model({"backbone": "toy", "embedding_dim": 4, "hidden": 8}).train_blocks(1)
    assert model.cache_layer(1) == "stem" and model.cache_layer(0) == "mix" and model.cache_layer("all") == "image"
    model(torch.rand(1, 3, 32, 32) * 255).sum().backward()
    assert model.backbone.stem.weight.grad is None and model.backbone.mix.weight.grad is not None
    assert model.model_config()["freeze_blocks"] == 1
    with pytest.raises(InputError, match="train_blocks=3"):
        model.train_blocks(3)


# -- partial fine-tuning on the real trunk ---------------------------------------------------------
def _vgg_reference_pool3(state, rgb):
    """conv1_1 .. conv3_3 and pool3 spelled out (BGR minus the Caffe mean; 'same' 2x2 pools)."""
    from segsort_unsup.contours.hed import MEAN_BGR

    x = rgb.double().flip(1) - torch.tensor(MEAN_BGR, dtype=torch.float64).view(1, 3, 1, 1)
    for b, n in enumerate((2, 2, 3), start=1):
        for i in range(n):
            x = F.relu(F.conv2d(x, state[f"block{b}.convs.{i}.weight"].double(),
                                state[f"block{b}.convs.{i}.bias"].double(), padding=1))
        x = F.max_pool2d(x, 2, 2, ceil_mode=True)
    return x


@pytest.mark.parametrize("train_blocks", [0, 1, 2, "all"])
def test_partial_mode_cache_and_forward_from(hed_h5, train_blocks):
    model = build_model({"feature_layer": "conv5_3", "embedding_dim": 8, "hidden": 16},
                        backbone_weights=hed_h5).eval().train_blocks(train_blocks)
    layer = model.cache_layer(train_blocks)
    assert layer == {0: "conv5_3", 1: "conv4_3", 2: "pool3", "all": "image"}[train_blocks]
    rgb = torch.rand(2, 3, 43, 58, generator=torch.Generator().manual_seed(3)) * 255
    with torch.no_grad():
        cached = model.features_at(layer, rgb)
        full = model(rgb)
        resumed = model.forward_from(layer, cached)
    assert torch.equal(resumed, full)  # the same ops on the same tensors
    if layer == "pool3":
        assert cached.shape == (2, 256, 6, 8)  # 256 channels at stride 8
        ref = _vgg_reference_pool3(model.backbone.state_dict(), rgb)
        torch.testing.assert_close(cached.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    trainable = [i for i in range(model.backbone.n_blocks)
                 if all(p.requires_grad for p in model.backbone.block_parameters(i))]
    expect = {0: [], 1: [4], 2: [3, 4], "all": [0, 1, 2, 3, 4]}[train_blocks]
    assert trainable == expect


def test_forward_from_checks_the_map(hed_h5):
    trunk = build_backbone("scratch", feature_layer="conv4_3")
    with pytest.raises(InputError, match="pool3 must be"):
        trunk.forward_from("pool3", torch.zeros(1, 512, 4, 4))
    with pytest.raises(InputError, match="no layer 'pool9'"):
        trunk.forward_from("pool9", torch.zeros(1, 256, 4, 4))


def test_partial_cached_training_trains_the_upper_block_and_resumes(toy, tiny, tmp_path):
    """train_blocks=1 on the toy trunk: maps cached at 'stem', 'mix' + head train, 'stem' stays; a
    run resumed from its middle checkpoint ends with the uninterrupted run's weights."""
    from segsort_unsup.train.stage import TrainConfig, run

    def config(**changes):
        return TrainConfig(**{**dict(backbone="toy", feature_layer="mix", mode="cached", train_blocks=1, steps=4,
                                     batch_size=2, crop=64, feature_scales=(1.0,), log_every=1, checkpoint_every=2,
                                     threads=1, head="conv1", hidden=8, embedding_dim=4, seed=3,
                                     images=str(tiny["images"]), features_dir=str(tmp_path / "features")),
                              **changes})

    torch.manual_seed(3)
    summary = run(config(), tiny["store"], tmp_path / "a")
    assert summary.ok and summary.done == 4
    trained, _ = load_model(tmp_path / "a" / "model.pt")
    init, _ = load_model(_untrained(config, tiny, tmp_path))
    assert torch.equal(trained.backbone.stem.weight, init.backbone.stem.weight)
    assert not torch.equal(trained.backbone.mix.weight, init.backbone.mix.weight)
    assert trained.model_config()["freeze_blocks"] == 1

    run(config(), tiny["store"], tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "step-0000004.pt").unlink()
    (tmp_path / "b" / "model.pt").unlink()
    resumed = run(config(), tiny["store"], tmp_path / "b")
    assert resumed.skipped == 2 and resumed.done == 2
    again, _ = load_model(tmp_path / "b" / "model.pt")
    for (name, a), b in zip(trained.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name

    # both blocks from cached images at stride 1: 8 cached cells per output cell, the stem trains too
    whole = run(config(train_blocks=2, steps=2, features_dir=str(tmp_path / "images")), tiny["store"], tmp_path / "c")
    assert whole.ok and whole.done == 2
    both, _ = load_model(tmp_path / "c" / "model.pt")
    assert not torch.equal(both.backbone.stem.weight, init.backbone.stem.weight)
    with pytest.raises(InputError, match="train_blocks"):
        config(mode="full")


def test_a_cached_layer_whose_stride_does_not_divide_the_output_stride_is_refused(monkeypatch, tiny, tmp_path):
    from segsort_unsup.train.stage import TrainConfig, run

    class Stride3Cache(ToyTrunk):
        def __init__(self, feature_layer):
            super().__init__(feature_layer)
            self.block_inputs = (FeatureLayer("image", 3, 1), FeatureLayer("stem", 8, 3))

    monkeypatch.setitem(BACKBONES, "toy3", Backbone("toy3", "cache at stride 3",
                                                    lambda **kw: Stride3Cache(kw["feature_layer"]), ("mix",)))
    with pytest.raises(InputError, match="stride 3, which does not divide the output stride 8"):
        run(TrainConfig(backbone="toy3", feature_layer="mix", mode="cached", train_blocks=1, steps=1, batch_size=2,
                        crop=64, threads=1, images=str(tiny["images"]), features_dir=str(tmp_path / "f")),
            tiny["store"], tmp_path / "run")


def test_pool2_crops_start_on_the_output_grid_and_give_the_whole_image_embedding(hed_h5):
    """train_blocks=2 caches pool2 (stride 4): a crop of 2 x cells cached cells starting on the
    stride-8 grid, through conv3, pool3, conv4 and the head, equals the whole image's embedding
    away from the crop's border (zero padding reaches a few cells in), and its grouping is the
    output grid's own nearest-neighbour sample of the full-resolution segments."""
    from segsort_unsup.embed.losses import segments_to_grid
    from segsort_unsup.train.data import crop_features

    model = build_model({"feature_layer": "conv4_3", "embedding_dim": 8, "hidden": 16},
                        backbone_weights=hed_h5).eval().train_blocks(2)
    assert model.cache_layer(2) == "pool2"
    gen = torch.Generator().manual_seed(5)
    rgb = torch.rand(1, 3, 200, 264, generator=gen) * 255
    seg = torch.randint(0, 50, (1, 200, 264), generator=gen, dtype=torch.int32)
    with torch.no_grad():
        pool2 = model.features_at("pool2", rgb)[0].numpy()
        whole = model(rgb)[0]
    assert pool2.shape[1:] == (50, 66) and whole.shape[1:] == (25, 33)
    cells, margin = 16, 6
    for seed in range(3):
        f, s, _ = crop_features(pool2, segments_to_grid(seg, (50, 66))[0].numpy(), None,
                                np.random.default_rng(seed), cells=cells, ignore_label=255, ratio=2)
        ref_rng = np.random.default_rng(seed)
        y0, x0 = int(ref_rng.integers(0, 25 - cells + 1)), int(ref_rng.integers(0, 33 - cells + 1))
        assert f.shape == (128, 2 * cells, 2 * cells)  # pool2: 128 channels at stride 4
        np.testing.assert_array_equal(s, segments_to_grid(seg, (25, 33))[0, y0:y0 + cells, x0:x0 + cells].numpy())
        with torch.no_grad():
            out = model.forward_from("pool2", torch.from_numpy(f)[None])[0]
        inner = (slice(None), slice(margin, cells - margin), slice(margin, cells - margin))
        expect = whole[:, y0:y0 + cells, x0:x0 + cells][inner]
        torch.testing.assert_close(out[inner], expect, rtol=1e-4, atol=1e-4)


def _untrained(config, tiny, tmp_path):
    from segsort_unsup.train.stage import run

    run(config(steps=0), tiny["store"], tmp_path / "init")
    return tmp_path / "init" / "model.pt"


def test_training_refuses_a_trunk_off_the_stride_8_grid(monkeypatch, tiny, tmp_path):
    from segsort_unsup.train.stage import TrainConfig, run

    class Stride16(ToyTrunk):
        def __init__(self, feature_layer):
            super().__init__(feature_layer)
            self.output = FeatureLayer(feature_layer, 16, 16)

        def run_block(self, index, x):
            x = super().run_block(index, x)
            return F.max_pool2d(x, 2, ceil_mode=True) if index == 1 else x

    monkeypatch.setitem(BACKBONES, "toy16", Backbone("toy16", "stride 16", lambda **kw: Stride16(kw["feature_layer"]),
                                                     ("mix",)))
    with pytest.raises(InputError, match="stride 16"):
        run(TrainConfig(backbone="toy16", feature_layer="mix", steps=1, batch_size=2, crop=64, threads=1,
                        images=str(tiny["images"])), tiny["store"], tmp_path / "run")
