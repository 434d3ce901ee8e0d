"""scripts/replay_dtp_epoch.py replays a target-propagation run's own batches: from the initial
weights it ends at the run's last checkpoint bit for bit, and from a mid-run checkpoint too."""

import importlib.util
from pathlib import Path

import torch
from typer.testing import CliRunner

from eprun.cli import app
from tests.test_dtp import DTP_RECIPE

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "replay_dtp_epoch.py"


def load_script():
    spec = importlib.util.spec_from_file_location("replay_dtp_epoch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_weights(net, checkpoint: Path):
    saved = torch.load(checkpoint, weights_only=True)["model"]
    for name, value in net.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_replay_from_the_initial_weights_ends_at_the_runs_weights(tmp_path, capsys):
    recipe = tmp_path / "tiny-dtp.yaml"
    recipe.write_text(DTP_RECIPE)
    result = CliRunner().invoke(app, ["--threads", "1", "train", str(recipe), "--out", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    replay = load_script()

    exp = replay.main([str(run), "--checkpoint", "none", "--epochs", "2", "--every", "1"])
    assert_same_weights(exp.net, run / "checkpoints" / "last.pt")
    printed = capsys.readouterr().out
    assert "epoch 2 batch 5: loss" in printed and "L3: |W|" in printed and "L_G" in printed


def test_replay_from_a_mid_run_checkpoint_and_with_overrides(tmp_path, capsys):
    recipe = tmp_path / "tiny-dtp.yaml"
    recipe.write_text(DTP_RECIPE.replace("  epochs: 2", "  epochs: 1"))
    result = CliRunner().invoke(app, ["--threads", "1", "train", str(recipe), "--out", str(tmp_path / "one"), "-q"])
    assert result.exit_code == 0, result.output
    one_epoch = Path(result.stdout.strip().splitlines()[-1])
    result = CliRunner().invoke(app, ["--threads", "1", "train", str(recipe), "--out", str(tmp_path / "two"), "-q",
                                      "-s", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    two_epochs = Path(result.stdout.strip().splitlines()[-1])
    replay = load_script()

    exp = replay.main([str(one_epoch), "--checkpoint", "last", "-s", "train.epochs=2"])
    assert_same_weights(exp.net, two_epochs / "checkpoints" / "last.pt")
    assert "restored" in capsys.readouterr().out
    slower = replay.main([str(one_epoch), "--checkpoint", "last", "-s", "train.epochs=2", "-s", "optim.lr=0.001"])
    assert not torch.equal(slower.net.layers[0].weight, exp.net.layers[0].weight)


def test_replay_of_an_augmented_run_draws_the_runs_augmentation(tmp_path):
    """Random crops and flips come from the run's own augmentation generator, restored with it."""
    recipe = tmp_path / "tiny-dtp.yaml"
    recipe.write_text(DTP_RECIPE)
    augmented = ["-s", "data.augment.random_crop_padding=1", "-s", "data.augment.horizontal_flip=true"]
    result = CliRunner().invoke(app, ["--threads", "1", "train", str(recipe), "--out", str(tmp_path / "runs"), "-q",
                                      *augmented])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])

    exp = load_script().main([str(run), "--checkpoint", "none", "--epochs", "2"])
    assert_same_weights(exp.net, run / "checkpoints" / "last.pt")
