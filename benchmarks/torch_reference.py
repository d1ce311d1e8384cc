"""Plain-PyTorch reference of the VPNs training iterations, with the authors' semantics.

    python benchmarks/torch_reference.py [--size 32] [--stem cifar] [--batch 128] [--repeats 3]
                                         [--width 1] [--density 0.1] [--pad SIZE//8] [--threads 2]
                                         [--device cpu|cuda] [--channels_last] [--autocast none|bf16] [--json]

Used to time the authors' way of doing one iteration next to the JAX version
(``benchmarks/step_time.py``). Imports torch only (no torchvision). The
semantics follow ``docs/method.md`` (sections 1-6 and 11):

* Every Conv2d and Linear is a ``SubnetConv``/``SubnetLinear`` with a ``scores``
  tensor the shape of its weight, initialised HYDRA-style:
  ``s = sqrt(6 / fan_in) * W / max|W|``.
* One global threshold over ``|s|`` of all scored layers:
  ``k = int((1 - d) * N)``, ``tau = kthvalue(|s|, k)``; each layer uses
  ``w = W * 1[|s| > tau]`` (strict), with a straight-through estimator that
  hands the incoming gradient to ``|s|`` unchanged. ``set_threshold`` recomputes
  tau; stage 1 calls it after every score-optimiser step.
* Stage 1: weights frozen (``requires_grad=False`` on conv/fc weights and the fc
  bias; BatchNorm keeps ``requires_grad=True`` but is in no optimiser), scores
  Adam 1e-4 wd 1e-4, prompt Adam 1e-4 wd 1e-4. Sub-step (a): prompted clean
  batch; (b): plain normalised augmented batch, whose prompt gradient is None,
  so torch skips the prompt step (no Adam count, no weight decay).
* Stage 2: scores frozen, mask fixed at the last tau; all non-score parameters
  (conv/fc weights, fc bias, BN affine) SGD 0.01 momentum 0.9 wd 1e-4, prompt
  SGD 0.01 momentum 0.9 wd 1e-4; no threshold recomputation.
* Dense step: a model put in dense mode by ``set_dense`` (threshold None, so the
  layers run plain ``F.conv2d``/``F.linear`` on ``W`` and never touch the
  scores, which are frozen): the cost of an unscored torchvision model.
* BatchNorm is in train mode (batch statistics, running-stat updates) in every
  training sub-step; evaluation uses running statistics, no prompt.

``torch.set_num_threads`` is the caller's business; ``main`` sets ``--threads``.

Placement and precision (``measure``, ``medians``, the CLI): ``--device`` runs
the model, the prompt and the batches on a torch device (default ``cpu``, where
with the other defaults every move is a no-op and nothing is autocast, so the
CPU numbers are those of the plain reference); ``--channels_last`` stores 4-D
weights and images as NHWC (the layout cuDNN's fastest convolutions want);
``--autocast bf16`` runs forward and loss under ``torch.autocast(device,
bfloat16)`` (backward and the optimisers stay float32, as mixed precision does
it). On CUDA each timed call ends with ``torch.cuda.synchronize()`` (kernels run
asynchronously), cuDNN's autotuner is on (XLA autotunes its convolutions too;
the warm-up call pays for it), and each row also gives
``torch.cuda.max_memory_allocated``. ``--json`` prints one JSON line (torch
version, device name, medians, peak bytes) for ``benchmarks/device_check.py``,
which runs this file in a process of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STEMS = ("imagenet", "cifar")
AUTOCAST = {"none": None, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- masks


class _StraightThroughMask(torch.autograd.Function):
    """Forward: ``1[a > tau]`` exactly 0/1. Backward: the gradient passes to ``a`` unchanged."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return (a > tau).to(a.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def hydra_scores(weight: torch.Tensor) -> torch.Tensor:
    """HYDRA's scaled score init ``sqrt(6 / fan_in) * W / max|W|`` (per layer)."""
    fan_in = weight[0].numel()  # in_ch * kh * kw for a conv, in_features for a linear
    return math.sqrt(6.0 / fan_in) * weight / weight.abs().max()


class _Scored:
    """Shared parts of the scored layers.

    ``threshold`` is the global tau as a 0-dim tensor (mask ``|s| > tau``), or
    None for dense mode: the plain weight, scores unused.
    """

    weight: nn.Parameter
    scores: nn.Parameter
    threshold: torch.Tensor | None

    def _init_scores(self) -> None:
        self.scores = nn.Parameter(hydra_scores(self.weight.detach()).clone())
        self.threshold = None

    def masked_weight(self) -> torch.Tensor:
        if self.threshold is None:
            return self.weight
        return self.weight * _StraightThroughMask.apply(self.scores.abs(), self.threshold)

    def mask(self) -> torch.Tensor:
        """The current 0/1 mask (all ones in dense mode), detached."""
        if self.threshold is None:
            return torch.ones_like(self.weight)
        return (self.scores.detach().abs() > self.threshold).to(self.weight.dtype)


class SubnetConv(nn.Conv2d, _Scored):
    """Conv2d whose forward uses ``W * 1[|scores| > threshold]`` (straight-through to the scores)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_scores()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class SubnetLinear(nn.Linear, _Scored):
    """Linear whose forward uses ``W * 1[|scores| > threshold]`` (straight-through to the scores)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_scores()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


def scored_layers(model: nn.Module) -> list[_Scored]:
    """Every SubnetConv/SubnetLinear of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, _Scored)]


@torch.no_grad()
def set_threshold(model: nn.Module, density: float) -> torch.Tensor:
    """Recompute the global tau from the current scores and hand it to every scored layer.

    ``k = int((1 - density) * N)``; ``tau = kthvalue(|s|, k)`` (1-based k-th
    smallest). With ``k < 1`` nothing is pruned: tau = -inf, so the mask is all
    ones but the scores still get their straight-through gradient.
    """
    layers = scored_layers(model)
    flat = torch.cat([m.scores.detach().abs().flatten() for m in layers])
    k = int((1 - density) * flat.numel())
    tau = torch.kthvalue(flat, k).values if k >= 1 else torch.tensor(float("-inf"), device=flat.device)
    for m in layers:
        m.threshold = tau
    return tau


def set_dense(model: nn.Module) -> None:
    """Dense mode: scored layers run on the plain weight (no mask work), scores frozen."""
    for m in scored_layers(model):
        m.threshold = None
        m.scores.requires_grad_(False)


def num_pruned(model: nn.Module) -> int:
    """Number of mask zeros over all scored layers."""
    return int(sum((m.mask() == 0).sum().item() for m in scored_layers(model)))


def score_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.scores for m in scored_layers(model)]


def non_score_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Conv/fc weights, fc bias and BatchNorm affine: everything but the scores."""
    scores = {id(p) for p in score_parameters(model)}
    return [p for p in model.parameters() if id(p) not in scores]


def layer_weights(model: nn.Module) -> list[nn.Parameter]:
    """Conv/fc weights and biases (frozen in stage 1); BatchNorm is excluded."""
    params = []
    for m in scored_layers(model):
        params.append(m.weight)
        if m.bias is not None:
            params.append(m.bias)
    return params


# --------------------------------------------------------------------------- ResNet-18


def scale_channels(channels: int, width: float) -> int:
    """vpns_jax's width rule (``vpns_jax.models.layers.scale_channels``): ``max(1, round(c * w))``."""
    return max(1, round(channels * width))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = SubnetConv(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = SubnetConv(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_channels != planes:
            self.downsample = nn.Sequential(
                SubnetConv(in_channels, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision-layout ResNet-18 (same attribute names) with scored convs and fc."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, stem: str = "cifar") -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid stems: {STEMS}")
        self.stem = stem
        in_channels = scale_channels(64, width)
        if stem == "imagenet":
            self.conv1 = SubnetConv(3, in_channels, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = SubnetConv(3, in_channels, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for i, base in enumerate((64, 128, 256, 512)):
            planes = scale_channels(base, width)
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_channels, planes, stride), BasicBlock(planes, planes)))
            in_channels = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = SubnetLinear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet18(num_classes: int = 10, width: float = 1.0, stem: str = "cifar") -> nn.Module:
    """ResNet-18 with every Conv2d/Linear scored (HYDRA init), in dense mode until ``set_threshold``.

    Weights follow torchvision's init (conv kaiming-normal fan-out, BN 1/0, fc
    the nn.Linear default); the scores are then derived from them.
    """
    model = ResNet18(num_classes, width, stem)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in scored_layers(model):
            m.scores.copy_(hydra_scores(m.weight))
    return model


# --------------------------------------------------------------------------- prompt and inputs


class Normalize(nn.Module):
    """ImageNet mean/std normalisation of NCHW images in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PadPrompt(nn.Module):
    """The authors' ``pad`` prompt at input size == output size (no zero padding).

    ``x' = normalize(clamp(x + program * M, 0, 1))`` with ``program`` (3, size, size)
    initialised to zeros (no sigmoid) and ``M`` 1 on the outer ``pad``-pixel frame.
    """

    def __init__(self, size: int, pad: int) -> None:
        super().__init__()
        self.program = nn.Parameter(torch.zeros(3, size, size))
        mask = torch.ones(1, size, size)
        mask[:, pad : size - pad, pad : size - pad] = 0.0
        self.register_buffer("frame_mask", mask)
        self.normalize = Normalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(torch.clamp(x + self.program * self.frame_mask, 0, 1))


def make_inputs(batch: int, size: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 images in [0, 1], NCHW; int64 labels in [0, num_classes))."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen, dtype=torch.int64)
    return images, labels


def _logits(model: nn.Module, x: torch.Tensor, label_map: torch.Tensor | None) -> torch.Tensor:
    logits = model(x)
    return logits if label_map is None else logits.index_select(1, label_map)


def _precision(x: torch.Tensor, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``x``'s device type, or nothing at all (plain float32) for None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(x.device.type, dtype=dtype)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- iterations


class DenseStep:
    """One dense SGD step (0.01, momentum 0.9, wd 1e-4) on all non-score parameters.

    Puts ``model`` in dense mode (``set_dense``), so give it its own model. ``autocast``: a dtype to run
    forward and loss in under ``torch.autocast``, or None (float32).
    """

    def __init__(self, model: nn.Module, *, lr: float = 0.01, label_map: torch.Tensor | None = None,
                 autocast: torch.dtype | None = None) -> None:
        set_dense(model)
        for p in non_score_parameters(model):
            p.requires_grad_(True)
        self.model, self.label_map, self.autocast = model, label_map, autocast
        self.normalize = Normalize().to(_device_of(model))  # a no-op on CPU
        self.optimizer = torch.optim.SGD(non_score_parameters(model), lr=lr, momentum=0.9, weight_decay=1e-4)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.model.train()
        with _precision(images, self.autocast):
            loss = F.cross_entropy(_logits(self.model, self.normalize(images), self.label_map), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class _TwoSubSteps:
    """Sub-step (a) prompted clean batch, then (b) plain normalised augmented batch."""

    model: nn.Module
    prompt: PadPrompt
    main_opt: torch.optim.Optimizer
    prompt_opt: torch.optim.Optimizer
    label_map: torch.Tensor | None
    density: float | None  # stage 1: recompute tau after every step; stage 2: None
    autocast: torch.dtype | None = None  # forward and loss under torch.autocast to this dtype; None: float32

    def _sub_step(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with _precision(x, self.autocast):
            loss = F.cross_entropy(_logits(self.model, x, self.label_map), labels)
        self.main_opt.zero_grad(set_to_none=True)
        self.prompt_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.main_opt.step()
        self.prompt_opt.step()  # skipped by torch for the prompt in (b): its grad is None
        if self.density is not None:
            set_threshold(self.model, self.density)
        return loss.detach()

    def __call__(self, vp_images: torch.Tensor, vp_labels: torch.Tensor,
                 train_images: torch.Tensor, train_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration: (a) on ``vp_images`` through the prompt, (b) on ``train_images`` unprompted."""
        self.model.train()
        loss_a = self._sub_step(self.prompt(vp_images), vp_labels)
        loss_b = self._sub_step(self.prompt.normalize(train_images), train_labels)
        return loss_a, loss_b


class Stage1Iteration(_TwoSubSteps):
    """Stage 1: scores (Adam 1e-4, wd 1e-4) and prompt (Adam 1e-4, wd 1e-4); weights frozen.

    Construction freezes conv/fc weights and biases (BN keeps requires_grad, as
    the authors' ``freeze_bn=False``), unfreezes the scores, makes fresh
    optimisers and sets the threshold for ``density``.
    """

    def __init__(self, model: nn.Module, prompt: PadPrompt, density: float, *, lr: float = 1e-4,
                 prompt_lr: float = 1e-4, label_map: torch.Tensor | None = None,
                 autocast: torch.dtype | None = None) -> None:
        for p in layer_weights(model):
            p.requires_grad_(False)
        for p in score_parameters(model):
            p.requires_grad_(True)
        prompt.program.requires_grad_(True)
        self.model, self.prompt, self.density, self.label_map = model, prompt, density, label_map
        self.autocast = autocast
        self.main_opt = torch.optim.Adam(score_parameters(model), lr=lr, weight_decay=1e-4)
        self.prompt_opt = torch.optim.Adam(prompt.parameters(), lr=prompt_lr, weight_decay=1e-4)
        set_threshold(model, density)


class Stage2Iteration(_TwoSubSteps):
    """Stage 2: weights + BN (SGD 0.01, momentum 0.9, wd 1e-4) and prompt (SGD 0.01, momentum 0.9, wd 1e-4).

    Scores are frozen (requires_grad False) and the mask stays at the threshold
    the model holds (the last stage-1 tau); construct after stage 1.
    """

    def __init__(self, model: nn.Module, prompt: PadPrompt, *, lr: float = 0.01, prompt_lr: float = 0.01,
                 label_map: torch.Tensor | None = None, autocast: torch.dtype | None = None) -> None:
        if any(m.threshold is None for m in scored_layers(model)):
            raise ValueError("Stage2Iteration needs a threshold: run set_threshold (or stage 1) first")
        for p in score_parameters(model):
            p.requires_grad_(False)
        for p in non_score_parameters(model):
            p.requires_grad_(True)
        prompt.program.requires_grad_(True)
        self.model, self.prompt, self.density, self.label_map = model, prompt, None, label_map
        self.autocast = autocast
        self.main_opt = torch.optim.SGD(non_score_parameters(model), lr=lr, momentum=0.9, weight_decay=1e-4)
        self.prompt_opt = torch.optim.SGD(prompt.parameters(), lr=prompt_lr, momentum=0.9, weight_decay=1e-4)


class EvalStep:
    """Eval mode, no grad, normalised input without the prompt: number of correct top-1 predictions."""

    def __init__(self, model: nn.Module, *, label_map: torch.Tensor | None = None,
                 autocast: torch.dtype | None = None) -> None:
        self.model, self.label_map, self.autocast = model, label_map, autocast
        self.normalize = Normalize().to(_device_of(model))  # a no-op on CPU

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        self.model.eval()
        with _precision(images, self.autocast):
            logits = _logits(self.model, self.normalize(images), self.label_map)
        self.model.train()
        return int((logits.argmax(1) == labels).sum().item())


# --------------------------------------------------------------------------- CLI


def time_call(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call.

    ``sync`` runs after each call, inside the timed span: ``torch.cuda.synchronize`` on CUDA, where a call
    returns once its kernels are queued rather than done."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompt_pad(size: int) -> int:
    """The authors' 16 px frame at 224 px, scaled to ``size``."""
    return max(1, size * 16 // 224)


def placer(device: torch.device, channels_last: bool) -> Callable:
    """A function moving a module or tensor to ``device``, 4-D ones NHWC in memory when ``channels_last``.

    On CPU without channels_last every move is a no-op: the default run is the one before these options."""
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def place(x):
        if isinstance(x, nn.Module) or x.dim() == 4:
            return x.to(device=device, memory_format=layout)
        return x.to(device=device)

    return place


def measure(*, width: float = 1.0, stem: str = "cifar", size: int = 32, batch: int = 128, repeats: int = 3,
            density: float = 0.1, num_classes: int = 10, pad: int | None = None, device: str = "cpu",
            channels_last: bool = False, autocast: torch.dtype | None = None) -> dict[str, dict[str, float]]:
    """``{"median_s": {row: seconds}, "peak_bytes": {row: bytes}}`` of the dense step, both stage iterations
    and the eval step (a warm-up call each); peak bytes (``torch.cuda.max_memory_allocated`` over the row) on
    CUDA only. ``device``, ``channels_last``, ``autocast``: as the module docstring says."""
    torch.manual_seed(0)
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # XLA autotunes its convolutions; the reference gets cuDNN's autotuner
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    place = placer(device, channels_last)
    pad = prompt_pad(size) if pad is None else pad
    vp_x, vp_y = map(place, make_inputs(batch, size, num_classes, seed=0))
    tr_x, tr_y = map(place, make_inputs(batch, size, num_classes, seed=1))
    dense = DenseStep(place(build_resnet18(num_classes, width, stem)), autocast=autocast)
    model = place(build_resnet18(num_classes, width, stem))
    prompt = place(PadPrompt(size, pad))
    out: dict[str, dict[str, float]] = {"median_s": {}, "peak_bytes": {}}

    def row(name: str, fn: Callable[[], object]) -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        out["median_s"][name] = time_call(fn, repeats, sync)
        if cuda:
            out["peak_bytes"][name] = torch.cuda.max_memory_allocated(device)

    row("dense train step", lambda: dense(tr_x, tr_y))
    stage1 = Stage1Iteration(model, prompt, density, autocast=autocast)
    row("VPNs stage-1 iteration", lambda: stage1(vp_x, vp_y, tr_x, tr_y))
    stage2 = Stage2Iteration(model, prompt, autocast=autocast)
    row("VPNs stage-2 iteration", lambda: stage2(vp_x, vp_y, tr_x, tr_y))
    evaluate = EvalStep(model, autocast=autocast)
    row("eval step", lambda: evaluate(tr_x, tr_y))
    return out


def medians(*, width: float = 1.0, stem: str = "cifar", size: int = 32, batch: int = 128, repeats: int = 3,
            density: float = 0.1, num_classes: int = 10, pad: int | None = None, device: str = "cpu",
            channels_last: bool = False, autocast: torch.dtype | None = None) -> dict[str, float]:
    """Median seconds of the dense step, both stage iterations and the eval step (a warm-up call each)."""
    return measure(width=width, stem=stem, size=size, batch=batch, repeats=repeats, density=density,
                   num_classes=num_classes, pad=pad, device=device, channels_last=channels_last,
                   autocast=autocast)["median_s"]


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--stem", default="cifar", choices=STEMS)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--pad", type=int, default=None, help="prompt frame width (default: 16 px at 224, scaled)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N")
    parser.add_argument("--channels_last", action="store_true", help="NHWC weights and images")
    parser.add_argument("--autocast", default="none", choices=sorted(AUTOCAST), help="forward and loss dtype")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch.cuda.is_available() is False (torch {torch.__version__})")
    torch.set_num_threads(args.threads)
    result = measure(width=args.width, stem=args.stem, size=args.size, batch=args.batch, repeats=args.repeats,
                     density=args.density, num_classes=args.num_classes, pad=args.pad, device=args.device,
                     channels_last=args.channels_last, autocast=AUTOCAST[args.autocast])
    if args.json:
        print(json.dumps({"torch": torch.__version__, "device": _device_name(args.device), **result}))
        return
    options = (f", autocast {args.autocast}" if args.autocast != "none" else "") + (
        ", channels_last" if args.channels_last else "")
    print(f"resnet18 width {args.width} {args.stem} stem {args.size}x{args.size} batch {args.batch}, "
          f"density {args.density}{options}")
    on = "" if args.device == "cpu" else f", on {_device_name(args.device)}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads{on}")
    print(f"{'step':<26}{'median s':>10}{'images/s':>10}")
    for name, median in result["median_s"].items():
        batches = 2 if name.startswith("VPNs") else 1
        print(f"{name:<26}{median:>10.3f}{args.batch * batches / median:>10.1f}")


if __name__ == "__main__":
    main()
