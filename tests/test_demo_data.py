"""The built-in demo dataset: scikit-learn's digits as a dog-breed-layout zip."""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipelines import demo_data
from pipelines.run import main
from steps.preprocess import main as preprocess_main

NAME_PATTERN = re.compile(r"dogImages/(train|valid|test)/(\d{3}\.[a-z]+)/([a-z]+)_\d{5}\.jpg")


def read_archive(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_dog_breed_layout_with_a_small_stratified_split(tmp_path):
    path = demo_data.write_digits_archive(tmp_path / "digits.zip", per_class_limit=5)
    assert path == tmp_path / "digits.zip"
    entries = read_archive(path)
    counts = Counter()
    for name, data in entries.items():
        match = NAME_PATTERN.fullmatch(name)
        assert match, name
        split, class_name, stem = match.groups()
        assert class_name.split(".")[1] == stem  # zero_00001.jpg lives in 000.zero
        counts[(split, class_name)] += 1
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    assert sorted({class_name for _, class_name in counts}) == list(demo_data.CLASS_NAMES)
    assert demo_data.CLASS_NAMES[0] == "000.zero" and demo_data.CLASS_NAMES[9] == "009.nine"
    for class_name in demo_data.CLASS_NAMES:
        assert (counts[("train", class_name)], counts[("valid", class_name)], counts[("test", class_name)]) == (3, 1, 1)
    assert not list(tmp_path.glob(".*partial"))


def test_the_archive_is_byte_identical_for_the_same_arguments(tmp_path):
    first = demo_data.write_digits_archive(tmp_path / "a.zip", per_class_limit=4)
    second = demo_data.write_digits_archive(tmp_path / "b.zip", per_class_limit=4)
    other_seed = demo_data.write_digits_archive(tmp_path / "c.zip", per_class_limit=4, seed=1)
    assert first.read_bytes() == second.read_bytes()
    assert read_archive(first) != read_archive(other_seed)


def test_image_size_is_configurable(tmp_path):
    entries = read_archive(demo_data.write_digits_archive(tmp_path / "d.zip", image_size=24, per_class_limit=1))
    assert len(entries) == 10  # one image per class goes to train
    for data in entries.values():
        assert Image.open(io.BytesIO(data)).size == (24, 24)


def test_whole_dataset_labels_match_the_pictures(tmp_path):
    """All 1797 digits, about 10 % each for valid and test; a nearest-centroid classifier on the written pictures
    gets the test split right, so every picture sits in its own digit's folder."""
    entries = read_archive(demo_data.write_digits_archive(tmp_path / "all.zip"))
    assert len(entries) == 1797
    pictures: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    split_sizes = Counter()
    for name, data in entries.items():
        split, class_name, _ = NAME_PATTERN.fullmatch(name).groups()
        split_sizes[split] += 1
        if split in pictures:
            small = Image.open(io.BytesIO(data)).convert("L").resize((8, 8), Image.Resampling.BOX)
            pictures[split].append(np.asarray(small, dtype=np.float64).ravel())
            labels[split].append(int(class_name[:3]))
    assert 170 <= split_sizes["valid"] <= 190 and 170 <= split_sizes["test"] <= 190
    train, train_labels = np.stack(pictures["train"]), np.array(labels["train"])
    centroids = np.stack([train[train_labels == digit].mean(axis=0) for digit in range(10)])
    test = np.stack(pictures["test"])
    predicted = np.argmin(((test[:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    assert (predicted == np.array(labels["test"])).mean() > 0.8


def test_the_processing_step_reads_it_without_upscaling(tmp_path):
    archive = demo_data.write_digits_archive(tmp_path / "digits.zip", per_class_limit=5)
    out = tmp_path / "out"
    assert preprocess_main(["--input", str(archive), "--output-dir", str(out), "--workers", "1"]) == 0
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["layout"] == "dog_breed"
    assert manifest["classes"] == list(demo_data.CLASS_NAMES)
    assert manifest["totals"] == {"train": 30, "valid": 10, "test": 10}
    assert manifest["skipped"] == [] and manifest["duplicates_removed"] == []
    for path in out.rglob("*.jpg"):
        assert Image.open(path).size == (32, 32)  # the 256 default only shrinks


def test_command_line(tmp_path, capsys):
    target = tmp_path / "cli" / "digits.zip"
    target.parent.mkdir()  # a command writes into a folder that exists, as any shell redirection does
    assert main(["demo-data", str(target), "--per-class-limit", "3", "--image-size", "16"]) == 0
    assert "wrote 30 digit images" in capsys.readouterr().out
    assert Image.open(io.BytesIO(next(iter(read_archive(target).values())))).size == (16, 16)
    assert main(["demo-data", str(target), "--per-class-limit", "0"]) == 2
    assert "per_class_limit" in capsys.readouterr().err


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="ImageSize=4 is outside 8 to 2048"):
        demo_data.write_digits_archive("unused.zip", image_size=4)
    with pytest.raises(ValueError, match="valid_fraction"):
        demo_data.write_digits_archive("unused.zip", valid_fraction=0.6, test_fraction=0.5)


def test_the_image_size_is_bounded_as_locals_is(tmp_path, capsys):
    """One bound (config.PARAMETER_BOUNDS["ImageSize"]) for `demo-data --image-size` and `local --image-size`."""
    from pipelines import config

    low, high, _ = config.PARAMETER_BOUNDS["ImageSize"]
    for size in (str(high + 1), "40000", str(low - 1), "1_6"):
        lines = []
        for command in (["demo-data", str(tmp_path / "d.zip")], ["local", "--workdir", str(tmp_path / "runs")]):
            with pytest.raises(SystemExit) as refused:
                main([*command, "--image-size", size])
            assert refused.value.code == 2
            lines.append(capsys.readouterr().err.strip().splitlines()[-1].split("--image-size: ")[1])
        assert lines[0] == lines[1] and (size == "1_6" or f"outside {low} to {high}" in lines[0]), lines
    assert not (tmp_path / "d.zip").exists() and not (tmp_path / "runs").exists()
