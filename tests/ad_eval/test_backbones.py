"""Tests of ad_eval.backbones: backbone.pt + json, imagenet: files, random inits, injection.

Everything is built offline from seeded random resnet18 weights written to tmp_path.

Run: ``python -m pytest -q tests/ad_eval/test_backbones.py``
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torchvision.models import resnet18

from ad_eval.backbones import (
    BACKBONE_FORMAT,
    Backbone,
    BackboneError,
    inject,
    load_backbone,
    validate_state_dict,
)
from ad_eval.datasets import IMAGENET_MEAN, IMAGENET_STD

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _weights(seed: int = 1, arch=resnet18) -> dict[str, torch.Tensor]:
    """A torchvision state dict with fc.*, as training would have it."""
    torch.manual_seed(seed)
    return arch().state_dict()


def _no_fc(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if not k.startswith("fc.")}


def _write_backbone(folder: Path, state_dict: dict, arch: str = "resnet18", **meta) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / "backbone.pt")
    info = {"format": BACKBONE_FORMAT, "arch": arch, "mean": list(MEAN), "std": list(STD)}
    info.update(recipe="ifs-test", seed=3, steps=10, image_size=64)
    info.update(meta)
    (folder / "backbone.json").write_text(json.dumps(info))
    return folder / "backbone.pt"


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- backbone.pt


def test_backbone_pt_round_trip(tmp_path):
    weights = _no_fc(_weights())
    path = _write_backbone(tmp_path / "run", weights)
    backbone = load_backbone(str(path))
    assert backbone.arch == "resnet18"
    assert backbone.mean == MEAN and backbone.std == STD
    assert backbone.meta["recipe"] == "ifs-test" and backbone.meta["steps"] == 10
    assert backbone.source == str(path)
    _assert_same(backbone.state_dict, weights)
    # the folder works as spec too, and arch may be repeated
    _assert_same(load_backbone(str(path.parent), arch="resnet18").state_dict, weights)


def test_build_gives_the_torchvision_model(tmp_path):
    backbone = load_backbone(str(_write_backbone(tmp_path, _no_fc(_weights()))))
    model = backbone.build()
    assert not model.training and isinstance(model.fc, nn.Identity)
    _assert_same(model.state_dict(), backbone.state_dict)
    reference = resnet18()
    reference.load_state_dict(_weights())
    reference.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference.eval()(x))
    # the model owns copies: training it does not change the Backbone
    with torch.no_grad():
        model.conv1.weight.add_(1)
    assert torch.equal(backbone.state_dict["conv1.weight"], _weights()["conv1.weight"])


def test_caller_arch_must_match_json(tmp_path):
    path = _write_backbone(tmp_path, _no_fc(_weights()))
    with pytest.raises(BackboneError, match=r"backbone\.json says arch=resnet18 but arch=resnet50"):
        load_backbone(str(path), arch="resnet50")


def test_wrong_architecture_is_named(tmp_path):
    path = _write_backbone(tmp_path, _no_fc(_weights()), arch="resnet50")
    with pytest.raises(
        BackboneError, match=r"backbone\.pt holds resnet18-shaped weights but arch=resnet50"
    ):
        load_backbone(str(path))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("layer1.0.conv1.weight"), r"backbone\.pt: missing key layer1\.0\.conv1\.weight"),
        (lambda sd: sd.update({"head.weight": torch.zeros(3)}), r"backbone\.pt: unexpected key head\.weight"),
        (
            lambda sd: sd.update({"conv1.weight": torch.zeros(64, 3, 3, 3)}),
            r"backbone\.pt: conv1\.weight has shape \(64, 3, 3, 3\), expected \(64, 3, 7, 7\)",
        ),
        (lambda sd: sd["layer2.1.bn2.weight"].__setitem__(0, float("nan")), r"layer2\.1\.bn2\.weight holds non-finite"),
        (lambda sd: sd["conv1.weight"].view(-1).__setitem__(5, float("inf")), r"conv1\.weight holds non-finite"),
    ],
    ids=["missing", "extra", "shape", "nan", "inf"],
)
def test_bad_state_dict(tmp_path, edit, message):
    weights = _no_fc(_weights())
    edit(weights)
    path = _write_backbone(tmp_path, weights)
    with pytest.raises(BackboneError, match=message):
        load_backbone(str(path))


def test_fc_keys_are_ignored_and_counters_filled(tmp_path):
    weights = _weights()  # with fc.*
    counters = [k for k in weights if k.endswith("num_batches_tracked")]
    assert counters
    for key in counters:  # old torchvision files lack them
        del weights[key]
    backbone = load_backbone(str(_write_backbone(tmp_path, weights)))
    assert not any(k.startswith("fc.") for k in backbone.state_dict)
    assert all(backbone.state_dict[k].item() == 0 for k in counters)
    assert len(backbone.state_dict) == len(_no_fc(_weights()))


def test_missing_json(tmp_path):
    torch.save(_no_fc(_weights()), tmp_path / "backbone.pt")
    with pytest.raises(BackboneError, match=r"backbone\.json: missing"):
        load_backbone(str(tmp_path / "backbone.pt"))


def test_a_training_checkpoint_says_how_to_export_its_backbone(tmp_path):
    # a fit's last.ckpt passed as --backbone used to be "checkpoints/last.json: missing"
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {f"net.{k}": v for k, v in _weights().items()}, "global_step": 6}, ckpt)
    with pytest.raises(BackboneError, match=r"last\.ckpt: a training checkpoint, not a backbone\.pt; write one with "
                                            r"`fractal-pretrain export-backbone .*last\.ckpt`"):
        load_backbone(str(ckpt))


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"format": "other/2"}, "format 'other/2' must be"),
        ({"arch": "vgg16"}, "arch 'vgg16' is not a supported architecture"),
        ({"mean": [0.5, 0.5]}, r"mean \[0.5, 0.5\] must be a list of 3 finite numbers"),
        ({"std": [0.2, 0.0, 0.2]}, "std .* must be > 0"),
    ],
)
def test_bad_json(tmp_path, meta, message):
    path = _write_backbone(tmp_path, _no_fc(_weights()), **meta)
    with pytest.raises(BackboneError, match=message):
        load_backbone(str(path))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(BackboneError, match="backbone file .*nowhere.pt not found"):
        load_backbone(str(tmp_path / "nowhere.pt"))
    _write_backbone(tmp_path, _no_fc(_weights()))
    (tmp_path / "backbone.pt").write_bytes(b"not a torch file")
    with pytest.raises(BackboneError, match=r"backbone\.pt: cannot read as a torch state dict"):
        load_backbone(str(tmp_path / "backbone.pt"))


# ----------------------------------------------------------------------------- imagenet:


def test_imagenet_file_with_fc_and_prefixes(tmp_path):
    weights = _weights(seed=2)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 90}
    torch.save(wrapped, tmp_path / "r18.pth")
    spec = f"imagenet:{tmp_path / 'r18.pth'}"
    backbone = load_backbone(spec, arch="resnet18")
    assert backbone.mean == IMAGENET_MEAN and backbone.std == IMAGENET_STD
    assert backbone.source == spec
    _assert_same(backbone.state_dict, _no_fc(weights))
    torch.save({f"backbone.{k}": v for k, v in weights.items()}, tmp_path / "lightning.pth")
    backbone = load_backbone(f"imagenet:{tmp_path / 'lightning.pth'}", arch="resnet18")
    _assert_same(backbone.state_dict, _no_fc(weights))


def test_imagenet_wrong_arch(tmp_path):
    torch.save(_weights(), tmp_path / "r18.pth")
    with pytest.raises(BackboneError, match="r18.pth holds resnet18-shaped weights but arch=resnet34"):
        load_backbone(f"imagenet:{tmp_path / 'r18.pth'}", arch="resnet34")


@pytest.mark.parametrize(
    ("arch", "filename", "enum"),
    [
        ("resnet18", "resnet18-f37072fd.pth", "ResNet18_Weights.IMAGENET1K_V1"),
        ("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth", "Wide_ResNet50_2_Weights.IMAGENET1K_V1"),
    ],
)
def test_missing_imagenet_file_says_what_to_download(tmp_path, arch, filename, enum):
    spec = f"imagenet:{tmp_path / 'weights.pth'}"
    with pytest.raises(BackboneError) as info:
        load_backbone(spec, arch=arch)
    message = str(info.value)
    assert message.startswith(f"{spec}: file not found; download the torchvision ImageNet weights")
    assert filename in message and enum in message and "\n" not in message


def test_arch_is_required_and_checked(tmp_path):
    with pytest.raises(BackboneError, match="random: arch is required"):
        load_backbone("random")
    with pytest.raises(BackboneError, match="imagenet:x.pth: arch is required"):
        load_backbone("imagenet:x.pth")
    with pytest.raises(BackboneError, match="arch='resnet19' is not a supported architecture"):
        load_backbone("random", arch="resnet19")


# ----------------------------------------------------------------------------- random


def test_random_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_backbone("random", arch="resnet18", seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = load_backbone("random", arch="resnet18", seed=7)
    c = load_backbone("random", arch="resnet18", seed=8)
    _assert_same(a.state_dict, b.state_dict)
    assert not torch.equal(a.state_dict["conv1.weight"], c.state_dict["conv1.weight"])
    assert a.mean == IMAGENET_MEAN and a.meta["seed"] == 7
    assert not any(k.startswith("fc.") for k in a.state_dict)
    torch.manual_seed(7)  # torchvision's own init under the same seed
    _assert_same(a.state_dict, _no_fc(resnet18().state_dict()))



def test_random_leaves_cuda_generators_alone_and_keeps_its_weights(monkeypatch):
    """torch.manual_seed inside fork_rng(devices=[]) also reseeded every CUDA generator (not restored); only
    the CPU generator may be seeded, and the same seed still gives the weights the old code gave."""
    with torch.random.fork_rng(devices=[]):  # the old code path, for reference
        torch.manual_seed(5)
        old = _no_fc(resnet18().state_dict())
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    state = torch.get_rng_state()
    backbone = load_backbone("random", arch="resnet18", seed=5)
    assert reseeded == []
    assert torch.equal(torch.get_rng_state(), state)
    _assert_same(backbone.state_dict, old)


# ----------------------------------------------------------------------------- inject


def test_inject_into_timm_extractor():
    backbone = load_backbone("random", arch="resnet18", seed=4)
    extractor = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=[1, 2])
    keys = inject(extractor, backbone, where="test extractor")
    assert keys == list(extractor.state_dict())
    assert not any(k.startswith(("layer3.", "layer4.", "fc.")) for k in keys)
    assert any(k.startswith("layer2.") for k in keys)
    for key, value in extractor.state_dict().items():
        assert torch.equal(value, backbone.state_dict[key]), key
    # the extractor computes what the torchvision model computes
    x = torch.randn(1, 3, 64, 64)
    model = backbone.build()
    with torch.no_grad():
        expected = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
        assert torch.allclose(extractor.eval()(x)[-1], expected, atol=1e-6)


def test_inject_refuses_mismatches():
    extractor = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=[1])
    before = {k: v.clone() for k, v in extractor.state_dict().items()}
    wrong = load_backbone("random", arch="resnet50")
    with pytest.raises(BackboneError, match=r"test: layer1\.0\.conv1\.weight has shape"):
        inject(extractor, wrong, where="test")
    backbone = load_backbone("random", arch="resnet18")
    partial = {k: v for k, v in backbone.state_dict.items() if k != "layer1.1.bn2.running_var"}
    broken = Backbone("resnet18", partial, IMAGENET_MEAN, IMAGENET_STD, "hand-made", {})
    with pytest.raises(BackboneError, match=r"test: extractor key layer1\.1\.bn2\.running_var is not in"):
        inject(extractor, broken, where="test")
    _assert_same(extractor.state_dict(), before)  # nothing was loaded


def test_validate_state_dict_keeps_model_order():
    weights = _no_fc(_weights())
    shuffled = dict(reversed(list(weights.items())))
    out = validate_state_dict(shuffled, "resnet18", where="mem")
    assert list(out) == list(weights)
