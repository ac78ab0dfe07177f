"""The shared model code: networks by name, heads, freezing, and the artifact on disk."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torchvision
from torch import nn

from entrypoints import contract, modeling


def _config(arch: str = "resnet18", hidden_units: int = 0, dropout: float = 0.0) -> modeling.ModelConfig:
    return modeling.ModelConfig(
        architecture=arch,
        num_classes=3,
        class_names=["cat", "dog", "fox"],
        hidden_units=hidden_units,
        dropout=dropout,
        input_size=32,
        resize_size=36,
    )


@pytest.mark.parametrize(
    "arch",
    [
        "resnet18",
        "mobilenet_v3_small",
        *(pytest.param(name, marks=pytest.mark.slow) for name in ("densenet121", "efficientnet_b0", "convnext_tiny")),
    ],
)
def test_every_family_gets_a_new_head_with_the_right_number_of_classes(arch: str) -> None:
    model = modeling.build_model(_config(arch)).eval()
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 3)
    head = modeling.head_module(model, arch)
    assert isinstance(head, nn.Sequential) and head[-1].out_features == 3


def test_hidden_units_make_a_two_layer_head_and_zero_makes_one_linear_layer() -> None:
    two_layer = modeling.make_head(512, 3, hidden_units=64, dropout=0.5)
    assert [type(m) for m in two_layer] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert two_layer[0].out_features == 64 and two_layer[2].p == 0.5
    one_layer = modeling.make_head(512, 3)
    assert [type(m) for m in one_layer] == [nn.Linear]


def test_freezing_leaves_only_the_last_blocks_and_the_head_trainable() -> None:
    model = modeling.build_model(_config())
    frozen = modeling.freeze_backbone(model, "resnet18", 1)
    assert len(frozen) == 4  # conv1, layer1, layer2, layer3
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}

    modeling.freeze_backbone(model, "resnet18", 0)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc"}

    modeling.freeze_backbone(model, "resnet18", modeling.parse_trainable_blocks("all"))
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_batch_norm_stays_in_eval_mode_during_training() -> None:
    model = modeling.build_model(_config())
    modeling.freeze_backbone(model, "resnet18", 1)
    modeling.set_train_mode(model)
    assert model.layer1[0].bn1.training is False
    assert model.layer4[0].bn1.training is True
    assert model.fc.training is True


@pytest.mark.parametrize("bad", ["-1", "x", "1.5"])
def test_bad_trainable_blocks_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        modeling.parse_trainable_blocks(bad)


def test_unknown_architecture_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        modeling.ModelConfig("vgg99", 1, ["a"])
    with pytest.raises(ValueError, match="num_classes"):
        modeling.ModelConfig("resnet18", 2, ["a"])


@pytest.mark.slow
def test_artifact_round_trip_predicts_the_same(tmp_path) -> None:
    torch.manual_seed(0)
    config = _config(hidden_units=8, dropout=0.1)
    model = modeling.build_model(config).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        before = model(x)
    modeling.save_artifact(model, tmp_path, config, hyperparameters={"lr": 0.1})

    assert json.loads((tmp_path / contract.HYPERPARAMETERS_FILE).read_text()) == {"lr": 0.1}
    code = tmp_path / contract.CODE_DIR
    for name in contract.SERVING_CODE_FILES:
        assert (code / name).is_file(), name
    assert (code / "requirements.txt").is_file()

    loaded, loaded_config = modeling.load_model(tmp_path)
    assert loaded_config == config
    with torch.inference_mode():
        after = loaded(x)
    torch.testing.assert_close(before, after)


@pytest.mark.slow
def test_backbone_weights_load_from_a_state_dict_file(tmp_path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-custom.pth"
    torch.save(reference.state_dict(), path)
    for source in (path, tmp_path):  # the file itself, or the weights channel folder holding it
        model = modeling.load_backbone_weights("resnet18", str(source))
        torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)


class _Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_weights_files_never_unpickle_code(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"conv1.weight": _Exploit()}, handle)
    with pytest.raises(pickle.UnpicklingError):
        modeling.load_backbone_weights("resnet18", str(path))


def test_a_weights_folder_must_hold_exactly_one_file(tmp_path) -> None:
    (tmp_path / "a.pth").write_bytes(b"")
    (tmp_path / "b.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="exactly one"):
        modeling.load_backbone_weights("resnet18", str(tmp_path))
    with pytest.raises(ValueError, match="none of these"):
        modeling.load_backbone_weights("resnet18", str(tmp_path / "missing.pth"))


def test_metric_line_is_read_back_by_the_tuner_regexes() -> None:
    line = contract.format_metrics_line(3, 0.412, 0.388, 0.871)
    assert contract.parse_metrics(f"noise\n{line}\nmore noise valid_accuracy=0.5") == [
        {"epoch": 3.0, "train_loss": 0.412, "valid_loss": 0.388, "valid_accuracy": 0.871}
    ]
