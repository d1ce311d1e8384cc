"""The plain-PyTorch VPNs reference (benchmarks/torch_reference.py) keeps the authors' semantics.

Needs torch, which is an optional benchmark dependency: skipped where it is missing.
"""

import importlib.util
import pathlib

import pytest

torch = pytest.importorskip("torch")

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "torch_reference.py"
_SPEC = importlib.util.spec_from_file_location("torch_reference", _PATH)
ref = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ref)

SIZE, PAD, BATCH, CLASSES, DENSITY = 16, 2, 8, 10, 0.3


def _setup():
    torch.manual_seed(0)
    model = ref.build_resnet18(CLASSES, width=1 / 16, stem="cifar")
    prompt = ref.PadPrompt(SIZE, PAD)
    batches = ref.make_inputs(BATCH, SIZE, CLASSES, seed=0) + ref.make_inputs(BATCH, SIZE, CLASSES, seed=1)
    return model, prompt, batches


def _bn_parameters(model):
    return [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]


def _snapshot(params):
    return [p.detach().clone() for p in params]


def test_width_rounding_and_hydra_init():
    model = ref.build_resnet18(CLASSES, width=1 / 16, stem="cifar")
    assert model.conv1.out_channels == 4 and model.layer4[1].conv2.out_channels == 32
    assert model.fc.in_features == 32 and model.layer2[0].downsample is not None
    for m in ref.scored_layers(model):
        bound = (6.0 / m.weight[0].numel()) ** 0.5
        assert torch.allclose(m.scores.abs().max(), torch.tensor(bound))
        assert torch.allclose(m.scores, bound * m.weight / m.weight.abs().max())


def test_stage1_then_stage2_semantics():
    model, prompt, batches = _setup()
    weights_before = _snapshot(ref.layer_weights(model))
    bn_before = _snapshot(_bn_parameters(model))
    stage1 = ref.Stage1Iteration(model, prompt, DENSITY)
    assert all(not p.requires_grad for p in ref.layer_weights(model))
    scores_init = _snapshot(ref.score_parameters(model))
    losses = stage1(*batches)
    assert all(torch.isfinite(x) for x in losses)

    # (1) exactly k entries pruned by the global threshold.
    n = sum(m.scores.numel() for m in ref.scored_layers(model))
    assert ref.num_pruned(model) == int((1 - DENSITY) * n)
    # The scores did move (straight-through gradient), and so did the prompt frame.
    assert any(not torch.equal(a, b) for a, b in zip(scores_init, ref.score_parameters(model)))
    assert prompt.program.abs().sum() > 0

    stage1(*batches)
    # (3) Adam step counts: two score steps per iteration, one prompt step (none in sub-step b).
    for p in ref.score_parameters(model):
        assert int(stage1.main_opt.state[p]["step"]) == 4
    assert int(stage1.prompt_opt.state[prompt.program]["step"]) == 2

    # (2) weights, fc bias and BN affine unchanged in stage 1.
    assert all(torch.equal(a, b) for a, b in zip(weights_before, ref.layer_weights(model)))
    assert all(p.requires_grad for p in _bn_parameters(model))  # as the authors: frozen by no optimiser
    assert all(torch.equal(a, b) for a, b in zip(bn_before, _bn_parameters(model)))

    tau = model.fc.threshold.clone()
    scores_before = _snapshot(ref.score_parameters(model))
    mask_before = [m.mask() for m in ref.scored_layers(model)]
    stage2 = ref.Stage2Iteration(model, prompt)
    weights_stage2 = _snapshot(ref.layer_weights(model))
    stage2(*batches)
    stage2(*batches)
    # (2) scores, threshold and mask unchanged in stage 2; the weights train.
    assert all(torch.equal(a, b) for a, b in zip(scores_before, ref.score_parameters(model)))
    assert torch.equal(model.fc.threshold, tau)
    assert all(torch.equal(a, m.mask()) for a, m in zip(mask_before, ref.scored_layers(model)))
    assert any(not torch.equal(a, b) for a, b in zip(weights_stage2, ref.layer_weights(model)))

    # (4) only the prompt frame ever changes: the inner region stays exactly 0.
    inner = prompt.program.detach()[:, PAD:SIZE - PAD, PAD:SIZE - PAD]
    assert torch.count_nonzero(inner) == 0
    frame = prompt.program.detach().clone()
    frame[:, PAD:SIZE - PAD, PAD:SIZE - PAD] = 1.0
    assert torch.count_nonzero(frame == 0) == 0

    correct = ref.EvalStep(model)(batches[0], batches[1])
    assert 0 <= correct <= BATCH


def test_straight_through_gradient_reaches_pruned_scores():
    model, _, (x, y, _, _) = _setup()
    ref.set_threshold(model, 0.1)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    fc = model.fc
    pruned = fc.mask() == 0
    assert fc.scores.grad is not None and fc.scores.grad[pruned].abs().sum() > 0
    # dL/ds = sign(s) * W * dL/dw with the masked w: check it on the fc.
    w = (fc.weight * fc.mask()).detach().requires_grad_(True)
    feats = {}

    def keep_input(module, inputs, output):
        feats["x"] = inputs[0].detach()  # returns None: the output stays as it is

    handle = fc.register_forward_hook(keep_input)
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    handle.remove()
    torch.nn.functional.cross_entropy(torch.nn.functional.linear(feats["x"], w, fc.bias.detach()), y).backward()
    expected = torch.sign(fc.scores.detach()) * fc.weight.detach() * w.grad
    assert torch.allclose(fc.scores.grad, expected, atol=1e-6)


def test_dense_step_trains_plain_weights():
    torch.manual_seed(0)
    model = ref.build_resnet18(CLASSES, width=1 / 16, stem="imagenet")
    step = ref.DenseStep(model)
    x, y = ref.make_inputs(BATCH, 32, CLASSES)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and 0 <= x.min() and x.max() <= 1
    scores = _snapshot(ref.score_parameters(model))
    before = _snapshot(ref.layer_weights(model))
    assert torch.isfinite(step(x, y))
    assert all(m.threshold is None for m in ref.scored_layers(model))
    assert all(torch.equal(a, b) for a, b in zip(scores, ref.score_parameters(model)))
    assert all(p.grad is None for p in ref.score_parameters(model))
    assert all(not torch.equal(a, b) for a, b in zip(before, ref.layer_weights(model)))
