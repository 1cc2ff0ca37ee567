"""Small PyTorch reference detectors with mmdetection 2.x module and key names, written from
`specs/detectors.md` (§1.2-1.3, §2-4, §9) for the converter's parity tests.

ResNet (pytorch and caffe style, BN in eval mode), FPN (extra convs on input / on output /
max-pool, ReLU before extra convs), and the RetinaNet, GFL and FCOS heads.
"""

import torch
from torch import nn
from torch.nn import functional as F


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, style):
        super().__init__()
        s1, s2 = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, s2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        idt = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + idt)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample, style):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        idt = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + idt)


BLOCKS = {18: (BasicBlock, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3)),
          101: (Bottleneck, (3, 4, 23, 3))}  # fmt: skip


class ResNet(nn.Module):
    def __init__(self, depth, base, style):
        super().__init__()
        block, counts = BLOCKS[depth]
        self.conv1 = nn.Conv2d(3, base, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        inplanes = base
        for s, n in enumerate(counts):
            planes = base * 2**s
            layers = []
            for b in range(n):
                stride = (1 if s == 0 else 2) if b == 0 else 1
                down = None
                if b == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    down = nn.Sequential(
                        nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                        nn.BatchNorm2d(planes * block.expansion),
                    )
                layers.append(block(inplanes, planes, stride, down, style))
                inplanes = planes * block.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        outs = []
        for s in range(4):
            x = getattr(self, f"layer{s + 1}")(x)
            outs.append(x)
        return outs


class ConvModule(nn.Module):
    """mmcv ConvModule: conv (bias only without norm) -> [gn] -> [relu]."""

    def __init__(self, cin, cout, k, stride=1, gn=False, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=not gn)
        if gn:
            self.gn = nn.GroupNorm(32, cout)
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        if hasattr(self, "gn"):
            x = self.gn(x)
        return F.relu(x) if self.act else x


class FPN(nn.Module):
    def __init__(self, in_channels, out, start_level, num_outs, extra, relu_before_extra):
        super().__init__()
        self.ins = in_channels[start_level:]
        self.lateral_convs = nn.ModuleList([ConvModule(c, out, 1, act=False) for c in self.ins])
        self.fpn_convs = nn.ModuleList([ConvModule(out, out, 3, act=False) for _ in self.ins])
        self.start_level, self.num_outs, self.extra = start_level, num_outs, extra
        self.relu_before_extra = relu_before_extra
        if extra:
            for j in range(num_outs - len(self.ins)):
                cin = in_channels[-1] if (j == 0 and extra == "on_input") else out
                self.fpn_convs.append(ConvModule(cin, out, 3, stride=2, act=False))

    def forward(self, feats):
        inputs = feats[self.start_level :]
        lat = [conv(x) for conv, x in zip(self.lateral_convs, inputs, strict=True)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:])
        outs = [self.fpn_convs[i](lat[i]) for i in range(len(lat))]
        n = len(outs)
        for j in range(self.num_outs - n):
            if not self.extra:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            elif j == 0:
                src = inputs[-1] if self.extra == "on_input" else outs[-1]
                outs.append(self.fpn_convs[n](src))
            else:
                src = F.relu(outs[-1]) if self.relu_before_extra else outs[-1]
                outs.append(self.fpn_convs[n + j](src))
        return outs


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return x * self.scale


class DenseHead(nn.Module):
    """RetinaHead ('retina'), GFLHead ('gfl') or FCOSHead ('fcos') with mmdetection names."""

    def __init__(self, kind, num_classes, ch, stacked, num_anchors=9, reg_max=16):
        super().__init__()
        gn = kind != "retina"
        self.kind = kind
        self.cls_convs = nn.ModuleList([ConvModule(ch, ch, 3, gn=gn) for _ in range(stacked)])
        self.reg_convs = nn.ModuleList([ConvModule(ch, ch, 3, gn=gn) for _ in range(stacked)])
        if kind == "retina":
            self.retina_cls = nn.Conv2d(ch, num_anchors * num_classes, 3, padding=1)
            self.retina_reg = nn.Conv2d(ch, num_anchors * 4, 3, padding=1)
        elif kind == "gfl":
            self.gfl_cls = nn.Conv2d(ch, num_classes, 3, padding=1)
            self.gfl_reg = nn.Conv2d(ch, 4 * (reg_max + 1), 3, padding=1)
            self.scales = nn.ModuleList([Scale() for _ in range(5)])
            self.integral = nn.Module()
            self.integral.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))
        else:
            self.conv_cls = nn.Conv2d(ch, num_classes, 3, padding=1)
            self.conv_reg = nn.Conv2d(ch, 4, 3, padding=1)
            self.conv_centerness = nn.Conv2d(ch, 1, 3, padding=1)
            self.scales = nn.ModuleList([Scale() for _ in range(5)])

    def forward(self, feats):
        outs = []
        for lvl, x in enumerate(feats):
            c = r = x
            for conv in self.cls_convs:
                c = conv(c)
            for conv in self.reg_convs:
                r = conv(r)
            if self.kind == "retina":
                outs.append((self.retina_cls(c), self.retina_reg(r)))
            elif self.kind == "gfl":
                outs.append((self.gfl_cls(c), self.scales[lvl](self.gfl_reg(r)).float()))
            else:
                reg = self.scales[lvl](self.conv_reg(r)).float().exp()
                outs.append((self.conv_cls(c), reg, self.conv_centerness(c)))
        return outs


class RPNHead(nn.Module):
    def __init__(self, ch, num_anchors=3):
        super().__init__()
        self.rpn_conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.rpn_cls = nn.Conv2d(ch, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(ch, num_anchors * 4, 1)

    def forward(self, feats):
        outs = []
        for x in feats:
            h = F.relu(self.rpn_conv(x))
            outs.append((self.rpn_cls(h), self.rpn_reg(h)))
        return outs


class Shared2FCBBoxHead(nn.Module):
    """mmdetection's Shared2FCBBoxHead: flatten (C, H, W), two fcs, fc_cls (K + 1), fc_reg."""

    def __init__(self, ch, fc, num_classes, roi=7):
        super().__init__()
        self.shared_fcs = nn.ModuleList([nn.Linear(ch * roi * roi, fc), nn.Linear(fc, fc)])
        self.fc_cls = nn.Linear(fc, num_classes + 1)
        self.fc_reg = nn.Linear(fc, 4 * num_classes)

    def forward(self, pooled):
        x = pooled.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class Detector(nn.Module):
    def __init__(self, kind, depth, base, style, neck, num_classes, stacked, fc=32):
        super().__init__()
        block = BLOCKS[depth][0]
        chans = [base * 2**s * block.expansion for s in range(4)]
        self.backbone = ResNet(depth, base, style)
        self.kind = kind
        if kind == "faster_rcnn":
            self.neck = FPN(chans, neck, 0, 5, False, False)
            self.rpn_head = RPNHead(neck)
            self.roi_head = nn.Module()
            self.roi_head.bbox_head = Shared2FCBBoxHead(neck, fc, num_classes)
            return
        extra = {"retina": "on_input", "gfl": "on_output", "fcos": "on_output"}[kind]
        self.neck = FPN(chans, neck, 1, 5, extra, kind == "fcos")
        self.bbox_head = DenseHead(kind, num_classes, neck, stacked)

    def forward(self, x):
        feats = self.backbone(x)
        pyramid = self.neck(feats)
        head = self.rpn_head if self.kind == "faster_rcnn" else self.bbox_head
        return feats, pyramid, head(pyramid)


def randomize(model, seed=0):
    """Random weights everywhere, BN statistics included, so no layer is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype == torch.int64:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("project"):
                continue
            elif name.endswith("scale") and t.ndim == 0:
                t.copy_(torch.rand((), generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()
