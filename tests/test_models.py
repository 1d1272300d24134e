"""Models: shapes, gradients, parameter counts, pretrained weights (generated state dicts)."""

from __future__ import annotations

import json
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_user_error, run_cli
from torch import nn

from nmosd_ms.errors import NmosdError
from nmosd_ms.models import MODELS, build_model
from nmosd_ms.models import weights as W
from nmosd_ms.models.complexity import count_flops, count_parameters
from nmosd_ms.models.networks import CentreTapConv2d, MultiViewNet, resnet_backbone

TORCH_MODELS = [n for n, s in MODELS.items() if s.is_torch]


@pytest.mark.parametrize("size", [24, pytest.param(100, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", TORCH_MODELS)
def test_shapes_and_gradients(name, size):
    torch.manual_seed(0)
    model = build_model(name, size=size)
    x = torch.randn(2, 1, size, size, size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 2)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_parameter_counts_match_the_references():
    assert round(count_parameters(build_model("resnet3d-18")) / 1e6, 2) == 33.16
    assert round(count_parameters(build_model("resnet3d-34")) / 1e6, 2) == 63.47
    for depth, n in ((18, 11_689_512), (34, 21_797_672)):
        net = resnet_backbone(depth, 2, 3)
        net.fc = nn.Linear(512, 1000)
        assert count_parameters(net) == n


def test_twoview_flops_are_far_below_resnet3d():
    assert count_flops(build_model("twoview-18", 100), 100) * 20 < count_flops(
        build_model("resnet3d-18", 100), 100
    )


# --- a reference ResNet written from the published architecture (He et al. 2016; torchvision) ---
class RefBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class RefResNet(nn.Module):
    def __init__(self, layers, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for i, (n, c) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(RefBlock(cin, c, 2 if (j == 0 and i > 0) else 1))
                cin = c
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _randomised(ref: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return ref.eval()


@pytest.mark.parametrize("depth,layers", [(18, [2, 2, 2, 2]), (34, [3, 4, 6, 3])])
def test_torchvision_state_dict_loads_strictly_and_matches_reference(depth, layers):
    ref = _randomised(RefResNet(layers))
    state = ref.state_dict()
    backbone = resnet_backbone(depth, 2, 3).eval()
    W.load_torchvision_backbone(backbone, state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone(x), ref.features(x))


@pytest.mark.parametrize("depth", [18, 34])
def test_centre_tap_backbone_equals_the_plain_one(depth):
    """The two-view backbone's 3×3 convolutions on 1×1 maps use only their centre tap; outputs
    and every gradient match the plain MONAI backbone holding the same weights."""
    torch.manual_seed(depth)
    net = MultiViewNet(100, depth=depth)
    # eval mode: train-mode BatchNorm over a batch at 1×1 divides by a 4-sample variance and
    # turns float rounding into O(1) noise, which would test BatchNorm, not the convolutions
    fast = net.backbone.eval()
    assert sum(isinstance(m, CentreTapConv2d) for m in fast.modules()) >= 12
    plain = resnet_backbone(depth, 2, 64).eval()
    plain.load_state_dict(fast.state_dict(), strict=True)
    x = torch.randn(4, 64, 32, 32)  # what the views give at S = 100: layer4 runs at 1×1
    out_fast, out_plain = fast(x), plain(x)

    def rel(a, b):  # float32 summation order differs; anything else would be O(1)
        return float(((a - b).norm() / b.norm().clamp_min(1e-12)).detach())

    assert rel(out_fast, out_plain) < 1e-4
    out_fast.square().sum().backward()
    out_plain.square().sum().backward()
    grads = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        assert rel(p.grad, grads[name].grad) < 1e-4, name


def test_conv1_adaptation_to_64_channels():
    w = torch.randn(64, 3, 7, 7)
    a = W.adapt_input_conv(64, w)
    assert a.shape == (64, 64, 7, 7)
    for c in range(64):
        assert torch.allclose(a[:, c], w[:, c % 3] * 3 / 64)
    # An input whose 64 channels repeat one RGB image gives (almost) the RGB response.
    img = torch.randn(1, 3, 20, 20)
    x64 = img.repeat(1, 22, 1, 1)[:, :64]
    out64 = torch.nn.functional.conv2d(x64, a)
    out3 = torch.nn.functional.conv2d(img, w)
    # 64 = 21 full RGB repeats + R: response = (21 * rgb + R-only) * 3/64
    r_only = torch.nn.functional.conv2d(img[:, :1], w[:, :1])
    assert torch.allclose(out64, (21 * out3 + r_only) * 3 / 64, atol=1e-4)
    assert torch.allclose(W.adapt_input_conv(1, w), w.sum(1, keepdim=True))


def test_imagenet_weights_from_torch_home_with_hash(tmp_path, monkeypatch):
    ref = _randomised(RefResNet([2, 2, 2, 2]))
    path = tmp_path / "hub" / "checkpoints" / "resnet18-test.pth"
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    prefix = W._sha256(path)[:8]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    spec = W.WeightsSpec(f"https://example.invalid/{path.name}", prefix)
    monkeypatch.setitem(W.IMAGENET, 18, spec)
    model = build_model("twoview-18", size=24, weights="imagenet")
    expected = W.adapt_input_conv(64, ref.state_dict()["conv1.weight"])
    assert torch.equal(model.backbone.conv1.weight.data, expected)
    assert torch.equal(model.backbone.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    # A file that does not match the published hash is refused.
    monkeypatch.setitem(W.IMAGENET, 18, W.WeightsSpec(spec.url, "00000000"))
    with pytest.raises(NmosdError, match="sha256"):
        build_model("twoview-18", size=24, weights="imagenet")


def test_imagenet_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(NmosdError, match="resnet18-f37072fd.pth") as exc:
        build_model("twoview-18", size=24, weights="imagenet")
    assert str(tmp_path / "hub" / "checkpoints") in str(exc.value)


def test_corrupt_and_pickled_weight_files_are_refused(tmp_path):
    good = tmp_path / "tv.pth"
    torch.save(RefResNet([2, 2, 2, 2]).state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(NmosdError, match="refusing"):
        build_model("twoview-18", size=24, weights=str(truncated))
    evil = tmp_path / "evil.pth"
    torch.save({"payload": RefBlock(3, 3, 1)}, evil)  # a pickled module, not tensors
    with pytest.raises(NmosdError, match="refusing"):
        build_model("twoview-18", size=24, weights=str(evil))
    model = build_model("twoview-18", size=24, weights=str(good))  # a torchvision file path
    assert model.backbone.conv1.weight.shape[1] == 64


def test_medicalnet_checkpoint_with_shortcut_a(tmp_path):
    src = resnet_backbone(18, 3, 1, shortcut_type="A")
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(1)
    path = tmp_path / "resnet_18_23dataset.pth"
    torch.save({"state_dict": state}, path)
    model = build_model("resnet3d-18", size=24, weights=str(path))
    assert not any("downsample" in k for k in model.state_dict())
    assert torch.equal(model.backbone.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
    assert model(torch.randn(2, 1, 24, 24, 24)).shape == (2, 2)
    with pytest.raises(NmosdError, match="no ImageNet weights"):
        build_model("resnet3d-18", weights="imagenet")


def test_models_cli_json():
    result = run_cli("models", "--size", "24", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    names = [r["name"] for r in rows]
    assert names == list(MODELS)
    assert all(set(r) == {"name", "parameters", "flops"} for r in rows)
    tv = next(r for r in rows if r["name"] == "twoview-18")
    assert tv["parameters"] == count_parameters(build_model("twoview-18", 24)) and tv["flops"] > 0
    assert_user_error(run_cli("cv", "nowhere", "--out", "x", "--models", "nope-1"), "unknown model")


@pytest.mark.parametrize("name,size", [("twoview-18", 24), ("resnet3d-18", 16)])
def test_bf16_weight_gradient_is_right_where_a_strided_conv_sees_one_pixel(name, size):
    """At these sizes strided convolutions of the backbone see a 1-pixel (1-voxel) input, where
    oneDNN's bf16 weight gradient is wrong on most calls (a 24³ bf16 run diverged). Each such
    convolution's bf16 weight gradient must equal, to float32 accumulation, the exact gradient
    of the same bf16-rounded input and weights, on every one of five calls."""
    torch.manual_seed(0)
    net = build_model(name, size=size).eval()
    seen = []

    def record(module, inputs, output):
        if all(n == 1 for n in inputs[0].shape[2:]) and max(module.stride) > 1:
            seen.append((module, inputs[0].detach().clone()))

    hooks = [
        m.register_forward_hook(record)
        for m in net.modules()
        if isinstance(m, nn.Conv2d | nn.Conv3d)
    ]
    with torch.no_grad():
        net(torch.rand(4, 1, size, size, size))
    for h in hooks:
        h.remove()
    assert len(seen) >= 2  # the shape this guards is there (layer3/layer4 at these sizes)
    for conv, x in seen:
        conv_nd = F.conv2d if x.dim() == 4 else F.conv3d
        x = x.bfloat16().float()
        w = conv.weight.detach().bfloat16().float().requires_grad_()
        ref = conv_nd(x, w, None, conv.stride, conv.padding)
        g = torch.randn_like(ref)
        ref.backward(g)
        for _ in range(5):
            conv.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = conv(x)
            out.float().backward(g)
            err = float((conv.weight.grad - w.grad).abs().max() / w.grad.abs().max())
            assert err < 0.02, err


def test_the_centre_tap_swap_draws_no_random_numbers():
    """Making a convolution a centre-tap one keeps its parameters and draws nothing from the
    global RNG, so a seed builds the same network as before the swap covered it (here the 3D
    ResNet, whose strided convolutions are swapped: the same draws as the plain backbone)."""
    from nmosd_ms.models.networks import CentreTapConv3d, ResNet3D

    torch.manual_seed(0)
    net = ResNet3D(18)
    after = torch.rand(3)
    torch.manual_seed(0)
    plain = resnet_backbone(18, 3, 1)
    nn.Linear(512, 2)
    assert torch.equal(after, torch.rand(3))
    assert sum(isinstance(m, CentreTapConv3d) for m in net.modules()) == 4  # conv1 + 3 strided
    net.backbone.load_state_dict(plain.state_dict())  # same keys
