"""A user's own data and network, refused in one line where they cannot be what they claim
(an auditor's findings, stop 47): validation images that are training images, a label of
10**9, object arrays in an npz, a torch.save file given as TorchScript (with --feature-layer
too), a TorchScript network that fails on the data's shape (its cause, not TorchScript's
preamble); and the robust recipe never keeping a network at chance on clean digits."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.datasets import load_dataset
from models.recipes.robust import better
from tests.conftest import blobs_and_mlp


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return blobs_and_mlp(tmp_path_factory.mktemp("byomchecks"))


def _arrays(npz: Path) -> dict[str, np.ndarray]:
    return dict(np.load(npz))


def test_validation_images_that_are_training_images_are_refused(data, tmp_path):
    arrays = _arrays(data[0])
    arrays["x_val"], arrays["y_val"] = arrays["x_train"][:30].copy(), arrays["y_train"][:30].copy()
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match="30 of the 30 validation images are also in the training split"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")
    load_dataset(f"npz:{data[0]}")  # the disjoint original loads


def test_a_huge_label_is_one_line_at_once(data, tmp_path):
    arrays = _arrays(data[0])
    arrays["y_train"] = arrays["y_train"].copy()
    arrays["y_train"][0] = 10**9
    np.savez(tmp_path / "d.npz", **arrays)
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"999999997 of the 1000000001 classes have no training image \(class 3, 4, 5"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("name", ["y_train", "class_names"])
def test_object_arrays_are_named(data, tmp_path, name):
    arrays = _arrays(data[0])
    arrays[name] = (np.array(arrays["y_train"].tolist(), dtype=object) if name == "y_train"
                    else np.array(["a", "b", "c"], dtype=object))
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=f"{name} is an array of Python objects"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("feature_layer", [None, "1"])
def test_a_torch_save_file_given_as_torchscript_is_one_line(data, tmp_path, capsys, feature_layer):
    from service import cli

    pickle_file = tmp_path / "net.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), pickle_file)
    argv = ["train", "--out", str(tmp_path / "b"), "--preset", "quick", "--steps", "classifier",
            "--dataset", f"npz:{data[0]}", "--classifier", f"torchscript:{pickle_file}"]
    assert cli.main(argv + (["--feature-layer", feature_layer] if feature_layer else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("shieldserve: error: ") and err.count("\n") == 1, err
    assert "is not a TorchScript file" in err and "torch.save file" in err
    assert not (tmp_path / "b").exists()  # no empty --out directory left behind


@pytest.mark.usefixtures("restore_logging")
def test_a_torchscript_network_failing_on_the_shape_says_why(data, tmp_path, capsys):
    from service import cli

    wrong = tmp_path / "mnist_shape.pt"
    torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(784, 3))).save(str(wrong))
    assert cli.main(["train", "--out", str(tmp_path / "b"), "--preset", "quick", "--steps", "classifier",
                     "--dataset", f"npz:{data[0]}", "--classifier", f"torchscript:{wrong}"]) == 2
    err = capsys.readouterr().err
    assert "does not run on this data's input" in err and "mat1 and mat2" in err, err
    assert not (tmp_path / "b").exists()


def test_the_robust_epoch_choice_never_keeps_a_network_at_chance():
    floor = 0.15  # quality.chance_bound(10)
    # the UCI digits' history: a constant network (10% clean, 10% under PGD) then real epochs
    # at 99.6% clean and 8% under PGD: the real one is kept
    assert better(0.9963, 0.08, 0.1, 0.1, floor)
    assert not better(0.1, 0.1, 0.9963, 0.08, floor)
    # among real epochs, PGD accuracy first, then clean, as before
    assert better(0.97, 0.90, 0.99, 0.85, floor) and not better(0.99, 0.85, 0.97, 0.90, floor)
    assert better(0.98, 0.90, 0.97, 0.90, floor)
    assert better(0.1, 0.1, -1.0, -1.0, floor)  # the first epoch beats the start


def test_a_brought_classifier_without_x_val_is_warned_about(data, tmp_path, caplog):
    from models.train import build_bundle, parse_classifier

    arrays = {k: v for k, v in _arrays(data[0]).items() if k not in ("x_val", "y_val")}
    np.savez(tmp_path / "d.npz", **arrays)
    build_bundle(tmp_path / "b", dataset=f"npz:{tmp_path / 'd.npz'}", preset="quick", steps=["classifier"],
                 classifier=parse_classifier(f"torchscript:{data[1]}", None, {}), argv=[])
    assert "has no x_val/y_val: the validation split is carved from x_train" in caplog.text
    caplog.clear()
    build_bundle(tmp_path / "c", dataset=f"npz:{data[0]}", preset="quick", steps=["classifier"],
                 classifier=parse_classifier(f"torchscript:{data[1]}", None, {}), argv=[])
    assert "carved" not in caplog.text
