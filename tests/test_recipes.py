"""Pure-function tests of the training recipe pieces: schedules, presets, whitening, lookahead, TTA."""

from __future__ import annotations

import pytest
import torch

from training.fastnet import FastNet
from training.graph import TestTimeAugment
from training.nets import build_model
from training.optim import Lookahead, param_groups
from training.presets import PRESETS, recipe
from training.schedules import SCHEDULES, rates
from training.train import parse_args


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 7, 391])
def test_every_schedule_runs_any_length_and_never_at_rate_zero(name: str, steps: int) -> None:
    lrs = rates(name, steps, lr=0.1)
    assert len(lrs) == steps
    assert all(0 < lr <= 0.1 + 1e-12 for lr in lrs), lrs[:5]


def test_schedule_shapes() -> None:
    step = rates("step", 30, lr=1.0)
    assert step[0] == 1.0 and step[10] == pytest.approx(0.1) and step[29] == pytest.approx(0.01)
    one = rates("onecycle", 100, lr=1.0, warmup=0.25)
    peak = max(range(100), key=one.__getitem__)
    assert 20 <= peak <= 30 and one[0] == pytest.approx(0.2, abs=0.02) and one[-1] < 0.1
    cos = rates("cosine", 100, lr=1.0, warmup=0.1)
    assert cos[0] < cos[9] and max(cos) == pytest.approx(1.0, abs=1e-6) and cos[-1] < 0.01
    with pytest.raises(ValueError, match="unknown schedule"):
        rates("linear", 10)


def test_preset_sets_defaults_and_explicit_flags_win() -> None:
    args = parse_args(["--preset", "fast", "--out", "x"])
    assert (args.model, args.epochs, args.tta, args.lr) == ("fastnet", 10, 2, PRESETS["fast"]["lr"])
    args = parse_args(["--preset", "fast", "--epochs", "3", "--model", "fastnet_tiny", "--out", "x"])
    assert (args.model, args.epochs) == ("fastnet_tiny", 3)
    # a smaller batch keeps the preset's rate per image; an explicit --lr is taken as given
    assert parse_args(["--preset", "fast", "--batch-size", "256", "--out", "x"]).lr == pytest.approx(
        PRESETS["fast"]["lr"] / 4)
    assert parse_args(["--preset", "fast", "--batch-size", "256", "--lr", "0.5", "--out", "x"]).lr == 0.5


def test_norm_biases_get_their_own_rate_and_the_same_per_step_decay() -> None:
    model = build_model("fastnet_tiny", 10)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = param_groups(model, names, lr=0.1, weight_decay=1e-3, norm_bias_lr_scale=64)
    assert len(groups) == 2
    plain, scaled = groups
    assert scaled["lr"] == pytest.approx(6.4) and scaled["lr"] * scaled["weight_decay"] == pytest.approx(1e-4)
    assert plain["lr"] * plain["weight_decay"] == pytest.approx(1e-4)
    frozen = {id(p) for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & {id(p) for g in groups for p in g["params"]}  # frozen stay out


def test_whitening_layer_decorrelates_patches() -> None:
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.5, 0.4], [0.0, 0.0, 0.3]])
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(200, 3, 16, 16))  # correlated channels
    model = FastNet((8, 8, 8))
    model.init_whitening(images)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, model.whiten.weight)  # no bias: the whitened patches
    flat = out[:, :12].permute(1, 0, 2, 3).reshape(12, -1)
    covariance = flat @ flat.T / flat.shape[1]
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])


def test_lookahead_pulls_fast_weights_toward_slow_ones() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    lookahead = Lookahead(model, every=1, base=0.5, power=0.0)  # decay 0.5 at every step
    with torch.no_grad():
        model.weight.fill_(1.0)
    lookahead.step(1, 10)
    assert torch.allclose(model.weight, torch.full((1, 2), 0.5))
    with torch.no_grad():
        model.weight.fill_(2.0)
    lookahead.step(10, 10)  # the last step ends on the slow weights, not on the latest fast ones
    assert torch.allclose(model.weight, torch.full((1, 2), 0.5))


def test_tta_level_2_averages_the_six_views() -> None:
    model = build_model("fastnet_tiny", 10).eval()
    x = torch.randn(3, 3, 32, 32)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, padded[:, :, :32, :32], padded[:, :, 2:, 2:]]
    weights = [0.5, 0.25, 0.25]
    with torch.no_grad():
        expected = sum(w * (model(v) + model(v.flip(3))) / 2 for w, v in zip(weights, views))
        assert torch.allclose(TestTimeAugment(model, 2)(x), expected, atol=1e-5)
        assert torch.allclose(TestTimeAugment(model, 1)(x), TestTimeAugment(model, 1)(x.flip(3)), atol=1e-5)


def test_default_rate_follows_the_batch_size_and_the_optimizer() -> None:
    """The linear scaling rule (docs/TRAINING.md: the old defaults' half rate per image was why
    training converged slowly): 0.1 per 128 images for SGD, 0.001 for Adam and RMSprop."""
    assert parse_args(["--out", "x"]).lr == pytest.approx(0.1)
    assert parse_args(["--batch-size", "512", "--out", "x"]).lr == pytest.approx(0.4)
    assert parse_args(["--optimizer", "adam", "--batch-size", "256", "--out", "x"]).lr == pytest.approx(0.002)
    assert parse_args(["--lr", "0.03", "--batch-size", "512", "--out", "x"]).lr == 0.03
    assert parse_args(["--out", "x"]).warmup == 0.0 and parse_args(["--schedule", "onecycle", "--out", "x"]).warmup == 0.15


def small_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))


def test_compile_probe_falls_back_to_eager_and_leaves_no_trace(capsys: pytest.CaptureFixture) -> None:
    """A compiler stack that fails (here a backend that raises, on a GPU host e.g. Triton without a
    C compiler) leaves training eager with a warning, not dead at its first step; a working one is
    kept. Either way the probe's step changes no weight, gradient or BatchNorm statistic."""
    from training.compute import compile_checked

    def broken(graph, inputs):
        raise RuntimeError("no compiler on this host")

    torch.manual_seed(0)
    example = torch.randn(5, 3, 8, 8)
    for backend, fell_back in ((broken, True), ("eager", False)):
        net = small_net()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        runner = compile_checked(net, example, backend=backend)
        assert (runner is net) == fell_back
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        assert all(p.grad is None for p in net.parameters())
        assert torch.allclose(runner(example), net(example))
    assert "torch.compile failed here" in capsys.readouterr().err


def test_frozen_norm_statistics_stay_while_scale_and_shift_train() -> None:
    from training.transfer import freeze_norm_statistics

    torch.manual_seed(0)
    model = build_model("resnet20", 2).train()
    freeze_norm_statistics(model)
    bn = model.stem[1]
    mean, var, shift = bn.running_mean.clone(), bn.running_var.clone(), bn.bias.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(8, 3, 32, 32) * 3 + 1).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert not torch.equal(bn.bias, shift) and model.training  # the rest of the model still trains


def test_every_preset_parses_and_names_a_known_network() -> None:
    from training.nets import ARCHITECTURES
    from training.presets import NEEDS_INIT_FROM

    for name in PRESETS:
        values = recipe(name)
        extra = ["--init-from", "x.pt"] if name in NEEDS_INIT_FROM else []
        args = parse_args(["--preset", name, "--out", "x", *extra])
        assert args.model in ARCHITECTURES and args.dataset == values["dataset"], name
        assert all(getattr(args, key) == value for key, value in values.items()), name
    with pytest.raises(SystemExit):  # the CIFAR-transfer preset needs its checkpoint
        parse_args(["--preset", "catsdogs-cifar", "--out", "x"])
    with pytest.raises(SystemExit):  # ImageNet weights exist for two networks only
        parse_args(["--model", "resnet20", "--pretrained", "imagenet", "--out", "x"])


def test_a_derived_preset_changes_only_what_it_names_and_keeps_the_rate_per_image() -> None:
    """``base``: the smoke budgets and the old ResNet-20 sessions are their recipes with a few values
    changed; a smaller batch without a rate of its own keeps the base's rate per image."""
    fast, smoke = recipe("fast"), recipe("fast-smoke")
    assert "base" not in smoke and smoke["batch_size"] == 256 and smoke["lr"] == pytest.approx(fast["lr"] / 4)
    assert {k for k in fast if smoke[k] != fast[k]} == {"model", "epochs", "batch_size", "lr", "tta"}
    more, old = recipe("resnet20-old-more"), recipe("resnet20-old")
    assert (more["epochs"], more["lr"], more["precision"]) == (10, 0.05, "fp32") and more["schedule"] == old["schedule"]
    assert recipe("catsdogs-resnet20-old-96")["image_size"] == 96 and recipe("catsdogs-resnet20-old-96")["lr"] == 0.02
    with pytest.raises(SystemExit):  # a later session starts from the one before
        parse_args(["--preset", "resnet20-old-more", "--out", "x"])


def test_makefile_and_gpu_run_name_presets_instead_of_spelling_recipes() -> None:
    """The recipe flags live in training/presets.py only: the Makefile's training commands and
    benchmarks/gpu_run.py give a preset and per-run flags, never a rate, a schedule or a budget."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    commands = re.findall(r"-m training\.train ((?:[^\n]*\\\n)*[^\n]*)", (repo / "Makefile").read_text())
    recipe_flags = ("--lr", "--schedule", "--warmup", "--label-smoothing", "--epochs", "--batch-size", "--model",
                    "--dataset", "--optimizer", "--image-size", "--head-epochs", "--tta")
    assert len(commands) >= 9 and all("--preset" in command for command in commands), commands
    assert not [c for c in commands if any(f"{flag} " in c for flag in recipe_flags)], commands
    gpu_run = (repo / "benchmarks" / "gpu_run.py").read_text()
    assert not [flag for flag in recipe_flags if f'"{flag}"' in gpu_run and flag not in ("--model", "--image-size")]
