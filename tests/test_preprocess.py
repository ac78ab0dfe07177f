"""The processing step: layouts, bad files, refusals, determinism, the manifest and the leakage check."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from _archives import (
    CIFAR_CLASSES,
    cifar_batch,
    dog_entries,
    image_bytes,
    imagefolder_entries,
    write_cifar_tarball,
    write_folder,
    write_tar,
    write_zip,
)
from PIL import Image, ImageOps

from entrypoints import contract
from steps import preprocess
from steps.preprocess import main

REPO = Path(__file__).resolve().parents[1]


def run_step(input_path: Path, output_dir: Path, *extra: str, workers: int = 1) -> int:
    return main(["--input", str(input_path), "--output-dir", str(output_dir), "--workers", str(workers), *extra])


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def output_files(output_dir: Path) -> dict[str, bytes]:
    return {
        path.relative_to(output_dir).as_posix(): path.read_bytes()
        for path in sorted(output_dir.rglob("*"))
        if path.is_file()
    }


def image_files(output_dir: Path, split: str) -> list[Path]:
    return sorted((output_dir / split).rglob("*.jpg"))


def assert_refused(capsys, code: int, *words: str) -> str:
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert error, "a refusal prints an error"
    last = error[-1]
    assert last.startswith("error: ")
    for word in words:
        assert word in last
    return last


def assert_nothing_published(output_dir: Path) -> None:
    """No split folder and no leftover work folder."""
    for split in contract.SPLITS:
        assert not (output_dir / split).exists()
    if output_dir.exists():
        assert [path.name for path in output_dir.iterdir()] == []


# --- the contract ------------------------------------------------------------------------------------------------


def test_file_names_equal_the_contract():
    assert preprocess.LABELS_FILE == contract.LABELS_FILE
    assert preprocess.MANIFEST_FILE == contract.MANIFEST_FILE
    assert preprocess.SPLITS == contract.SPLITS
    assert preprocess.DEFAULT_IMAGE_SIZE == contract.DEFAULT_RESIZE_SIZE
    parser = preprocess.get_args_parser()
    defaults = vars(parser.parse_args([]))
    assert defaults["image_size"] == contract.DEFAULT_RESIZE_SIZE
    assert str(defaults["input"]) == "/opt/ml/processing/input/data"
    assert str(defaults["output_dir"]) == "/opt/ml/processing/output"


@pytest.mark.slow
def test_step_runs_as_a_script_with_the_contract_shipped_beside_it(tmp_path):
    """In the processing container the script has contract.py as the step's "contract" input, beside its code
    input: a name changed in contract.py (here the labels file) reaches the script, which keeps no copy."""
    from pipelines import config

    code_dir = tmp_path / "container" / "input" / "code"
    contract_dir = tmp_path / "container" / "input" / Path(config.PREPROCESS_CONTRACT_DIR).name
    code_dir.mkdir(parents=True)
    contract_dir.mkdir()
    shutil.copy(REPO / "steps" / "preprocess.py", code_dir / "preprocess.py")
    shipped = (REPO / "entrypoints" / "contract.py").read_text()
    assert 'LABELS_FILE = "labels.json"' in shipped
    (contract_dir / "contract.py").write_text(shipped.replace('LABELS_FILE = "labels.json"', 'LABELS_FILE = "c.json"'))
    archive = write_zip(tmp_path / "dogs.zip", dog_entries())
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run(
        [
            sys.executable,
            "preprocess.py",
            "--input",
            str(archive),
            "--output-dir",
            str(tmp_path / "out"),
            "--workers",
            "2",
        ],
        cwd=code_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert read_json(tmp_path / "out" / "train" / "manifest.json")["totals"] == {"train": 6, "valid": 2, "test": 2}
    assert (tmp_path / "out" / "train" / "c.json").is_file()
    assert not (tmp_path / "out" / "train" / "labels.json").exists()
    tree = ast.parse((REPO / "steps" / "preprocess.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    optional = {"tqdm"}  # imported under try/except ImportError: a progress bar where it is installed
    # the contract: shipped as contract.py in the container, entrypoints.contract in the repository
    assert imported - set(sys.stdlib_module_names) - optional == {"numpy", "PIL", "contract", "entrypoints"}


# --- layouts -------------------------------------------------------------------------------------------------------


def test_dog_breed_zip_keeps_its_split_and_writes_the_contract(tmp_path):
    archive = write_zip(tmp_path / "dogImages.zip", dog_entries(size=(40, 30)))
    out = tmp_path / "out"
    assert run_step(archive, out, "--image-size", "16") == 0

    manifests = [(out / split / "manifest.json").read_bytes() for split in contract.SPLITS]
    labels = [(out / split / "labels.json").read_bytes() for split in contract.SPLITS]
    assert manifests[0] == manifests[1] == manifests[2]
    assert labels[0] == labels[1] == labels[2]
    assert json.loads(labels[0]) == ["001.Affenpinscher", "002.Afghan_hound"]
    manifest = json.loads(manifests[0])
    assert manifest["layout"] == "dog_breed"
    assert manifest["dataset_root"] == "dogImages"
    assert manifest["counts"] == {
        "train": {"001.Affenpinscher": 3, "002.Afghan_hound": 3},
        "valid": {"001.Affenpinscher": 1, "002.Afghan_hound": 1},
        "test": {"001.Affenpinscher": 1, "002.Afghan_hound": 1},
    }
    # The archive's split is kept: every image lands in the split folder it came from, under its own name.
    assert sorted(p.relative_to(out).as_posix() for p in image_files(out, "valid")) == [
        "valid/001.Affenpinscher/Affenpinscher_00004.jpg",
        "valid/002.Afghan_hound/Afghan_hound_00004.jpg",
    ]
    for split in contract.SPLITS:
        for path in image_files(out, split):
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                # torchvision Resize(16) of 40x30: short side 16, long side int(16 * 40 / 30) = 21
                assert image.size == (21, 16)


def test_small_images_are_not_upscaled(tmp_path):
    archive = write_zip(tmp_path / "dogs.zip", dog_entries(size=(12, 10)))
    assert run_step(archive, tmp_path / "out", "--image-size", "16") == 0
    for path in image_files(tmp_path / "out", "train"):
        with Image.open(path) as image:
            assert image.size == (12, 10)


def test_zip_tar_and_folder_inputs_give_the_same_dataset(tmp_path):
    entries = dog_entries(classes=("001.A", "002.B", "003.C"), size=(24, 20))
    inputs = {
        "zip": write_zip(tmp_path / "in.zip", entries),
        "tar.gz": write_tar(tmp_path / "in.tar.gz", entries),
        "tar": write_tar(tmp_path / "in.tar", entries, mode="w"),
        "folder": write_folder(tmp_path / "in_folder", entries),
    }
    outputs = {}
    for kind, path in inputs.items():
        out = tmp_path / f"out_{kind}"
        assert run_step(path, out, "--image-size", "16") == 0, kind
        files = output_files(out)
        manifest = json.loads(files.pop("train/manifest.json"))
        assert manifest["input"]["format"] == kind.split(".")[0]
        outputs[kind] = {name: data for name, data in files.items() if name.endswith(".jpg")}
    assert outputs["zip"] == outputs["tar.gz"] == outputs["tar"] == outputs["folder"]
    assert len(outputs["zip"]) == 15


def test_a_folder_holding_exactly_one_archive_means_that_archive(tmp_path):
    channel = tmp_path / "input" / "data"
    channel.mkdir(parents=True)
    write_zip(channel / "dogImages.zip", dog_entries())
    assert run_step(channel, tmp_path / "out") == 0
    manifest = read_json(tmp_path / "out" / "valid" / "manifest.json")
    assert manifest["input"]["name"] == "dogImages.zip" and manifest["input"]["format"] == "zip"


def test_a_folder_with_two_archives_is_refused(tmp_path, capsys):
    channel = tmp_path / "data"
    channel.mkdir()
    write_zip(channel / "a.zip", dog_entries())
    write_zip(channel / "b.zip", dog_entries())
    assert_refused(capsys, run_step(channel, tmp_path / "out"), "2 archives", "a.zip")


def test_imagefolder_gets_a_stratified_seeded_split(tmp_path):
    entries = imagefolder_entries({"cats": 20, "dogs": 10, "eels": 3}, root="pets")
    archive = write_zip(tmp_path / "pets.zip", entries)
    out = tmp_path / "out"
    assert run_step(archive, out, "--valid-fraction", "0.2", "--test-fraction", "0.1", "--seed", "7") == 0
    manifest = read_json(out / "train" / "manifest.json")
    assert manifest["layout"] == "imagefolder"
    assert manifest["classes"] == ["cats", "dogs", "eels"]
    assert manifest["counts"] == {
        "train": {"cats": 14, "dogs": 7, "eels": 1},
        "valid": {"cats": 4, "dogs": 2, "eels": 1},
        "test": {"cats": 2, "dogs": 1, "eels": 1},
    }
    # Every source image is in exactly one split.
    names = [path.relative_to(out / split).as_posix() for split in contract.SPLITS for path in image_files(out, split)]
    assert sorted(names) == sorted(name.removeprefix("pets/") for name in entries)

    def split_of(output: Path) -> dict[str, str]:
        return {path.relative_to(output / s).as_posix(): s for s in contract.SPLITS for path in image_files(output, s)}

    assert (
        run_step(archive, tmp_path / "again", "--valid-fraction", "0.2", "--test-fraction", "0.1", "--seed", "7") == 0
    )
    assert split_of(tmp_path / "again") == split_of(out)
    assert (
        run_step(archive, tmp_path / "other", "--valid-fraction", "0.2", "--test-fraction", "0.1", "--seed", "8") == 0
    )
    assert split_of(tmp_path / "other") != split_of(out)


def test_split_layout_without_valid_carves_it_out_of_train(tmp_path):
    entries = dog_entries(per_split={"train": 10, "test": 2})
    archive = write_zip(tmp_path / "dogs.zip", entries)
    assert run_step(archive, tmp_path / "out", "--valid-fraction", "0.2") == 0
    manifest = read_json(tmp_path / "out" / "train" / "manifest.json")
    assert manifest["totals"] == {"train": 16, "valid": 4, "test": 4}
    assert "train/" in manifest["splits_from"]["valid"]
    assert manifest["splits_from"]["test"] == "kept from the input"


def test_cifar10_tarball_in_the_real_pickle_format(tmp_path):
    archive = write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz", train_per_class=10, test_per_class=2)
    out = tmp_path / "out"
    assert run_step(archive, out, "--valid-fraction", "0.2", "--test-fraction", "0.5") == 0
    manifest = read_json(out / "test" / "manifest.json")
    assert manifest["layout"] == "cifar10"
    assert read_json(out / "train" / "labels.json") == list(CIFAR_CLASSES)  # batches.meta order
    assert manifest["counts"]["train"] == dict.fromkeys(CIFAR_CLASSES, 8)
    assert manifest["counts"]["valid"] == dict.fromkeys(CIFAR_CLASSES, 2)  # 0.2 of the training batches
    assert manifest["counts"]["test"] == dict.fromkeys(CIFAR_CLASSES, 2)  # the test batch, whatever --test-fraction
    assert {entry["path"] for entry in manifest["skipped"]} == {"cifar-10-batches-py/readme.html"}

    # Pixels survive: the first test image is row 0 of test_batch, label 0, named after its filename.
    source = cifar_batch([0, 1, 2] * 2, "test", "testing batch")[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    with Image.open(out / "test" / "airplane" / "test_000000.jpg") as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        assert np.abs(np.asarray(image, dtype=np.int16) - source).mean() < 6


def test_cifar_pickles_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    hostile_meta = pickle.dumps({b"label_names": [b"a", b"b"], b"payload": Hostile()}, protocol=2)
    archive = write_cifar_tarball(tmp_path / "cifar.tar.gz", meta=hostile_meta)
    last = assert_refused(capsys, run_step(archive, tmp_path / "out"), "batches.meta", "refused to load the global")
    assert "mkdir" in last
    assert not marker.exists()
    assert_nothing_published(tmp_path / "out")
    # while plain numpy arrays still load
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(preprocess.restricted_loads(pickle.dumps({b"data": array}, protocol=2))[b"data"], array)
    with pytest.raises(pickle.UnpicklingError):
        preprocess.restricted_loads(pickle.dumps(Path("x")))


# --- bad files ---------------------------------------------------------------------------------------------------


def test_bad_files_are_skipped_or_converted_with_reasons(tmp_path):
    good = image_bytes("good", size=(24, 20))
    entries = {f"shop/cats/ok_{n}.jpg": image_bytes(f"cat{n}", size=(24, 20)) for n in range(3)}
    entries |= {f"shop/dogs/ok_{n}.jpg": image_bytes(f"dog{n}", size=(24, 20)) for n in range(3)}
    entries |= {
        "shop/cats/truncated.jpg": good[: len(good) // 2],
        "shop/cats/corrupt.jpg": good.replace(b"\xff\xdb", b"\xff\xdb\x00\x02", 1),  # a damaged quantisation table
        "shop/cats/bad_header.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "shop/cats/notes.txt": b"these are cats",
        "shop/cats/empty.jpg": b"",
        "shop/cats/huge.png": image_bytes("huge", size=(60, 50), image_format="PNG"),
        "shop/dogs/gray.jpg": image_bytes("gray", mode="L"),
        "shop/dogs/cmyk.jpg": image_bytes("cmyk", mode="CMYK"),
        "shop/dogs/palette.png": image_bytes("palette", mode="P", image_format="PNG"),
        "shop/dogs/alpha.png": image_bytes("alpha", mode="RGBA", image_format="PNG"),
        "shop/dogs/deep.png": image_bytes("deep", mode="I;16", image_format="PNG", size=(32, 8)),
        "shop/dogs/rotated.jpg": image_bytes("rotated", size=(24, 12), exif_orientation=6),
        "shop/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "__MACOSX/shop/cats/._ok_0.jpg": b"\x00\x05\x16\x07",
    }
    archive = write_zip(tmp_path / "shop.zip", entries)
    out = tmp_path / "out"
    assert run_step(archive, out, "--max-image-pixels", "2000", "--test-fraction", "0", "--valid-fraction", "0") == 0
    manifest = read_json(out / "train" / "manifest.json")
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(reasons) == {
        "shop/cats/truncated.jpg",
        "shop/cats/corrupt.jpg",
        "shop/cats/bad_header.jpg",
        "shop/cats/notes.txt",
        "shop/cats/empty.jpg",
        "shop/cats/huge.png",
        "shop/.DS_Store",
        "__MACOSX/shop/cats/._ok_0.jpg",
    }
    assert "truncated" in reasons["shop/cats/truncated.jpg"]
    assert reasons["shop/cats/corrupt.jpg"].startswith("corrupt or truncated image")
    assert reasons["shop/cats/bad_header.jpg"] == "corrupt image (starts like a JPEG file but cannot be read)"
    assert reasons["shop/cats/notes.txt"] == "not an image (no image format recognised)"
    assert reasons["shop/cats/empty.jpg"] == "zero-byte file"
    assert "60x50 = 3000 pixels is over the limit of 2000" in reasons["shop/cats/huge.png"]
    assert manifest["counts"]["train"] == {"cats": 3, "dogs": 9}

    converted = {path.stem: path for path in (out / "train" / "dogs").iterdir()}
    for stem in ("gray", "cmyk", "palette", "alpha", "deep", "rotated"):
        with Image.open(converted[stem]) as image:
            assert image.format == "JPEG" and image.mode == "RGB", stem
    # 16-bit data is scaled, not clipped to white: a 0..65535 gradient stays a dark-to-light gradient.
    deep = np.asarray(Image.open(converted["deep"]).convert("L"), dtype=np.float64)
    assert deep.min() < 40 and deep.max() > 215 and 90 < deep.mean() < 165
    # EXIF orientation 6: a 24x12 stored image is a 12x24 upright one, with the upright pixels.
    with Image.open(converted["rotated"]) as image:
        assert image.size == (12, 24)
        expected = ImageOps.exif_transpose(Image.open(io.BytesIO(entries["shop/dogs/rotated.jpg"]))).convert("RGB")
        assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).mean() < 6
    assert manifest["conversions"]["EXIF orientation made upright"] == 1
    assert manifest["conversions"]["CMYK to RGB"] == 1
    assert manifest["conversions"]["I;16 to RGB"] == 1
    assert manifest["conversions"]["L to RGB"] == 1
    assert manifest["conversions"]["RGBA with transparency to RGB on white"] == 1
    assert manifest["conversions"]["P with transparency to RGB on white"] == 1
    assert manifest["conversions"]["kept original JPEG"] == 6


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # fully transparent black
    rgba[:, 8:] = (255, 0, 0, 255)  # opaque red on the right
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    entries = imagefolder_entries({"a": 2, "b": 2}) | {"a/clear.png": buffer.getvalue()}
    assert (
        run_step(
            write_zip(tmp_path / "in.zip", entries), tmp_path / "out", "--valid-fraction", "0", "--test-fraction", "0"
        )
        == 0
    )
    pixels = np.asarray(Image.open(tmp_path / "out" / "train" / "a" / "clear.jpg"), dtype=np.int16)
    assert (pixels[:, :6] > 240).all()  # white where it was transparent
    assert (pixels[:, 10:, 0] > 200).all() and (pixels[:, 10:, 1] < 60).all()  # still red where it was opaque


# --- refusals ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../evil.jpg", ("'..'",)),
        ("/abs/evil.jpg", ("absolute path",)),
        ("dogImages/train/../../../evil.jpg", ("'..'",)),
    ],
)
def test_zip_entries_that_escape_are_refused(tmp_path, capsys, name, words):
    entries = dog_entries() | {name: image_bytes("evil")}
    archive = write_zip(tmp_path / "evil.zip", entries)
    out = tmp_path / "work" / "out"
    assert_refused(capsys, run_step(archive, out), "outside", *words)
    assert not (tmp_path / "work" / "evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()
    assert_nothing_published(out)


def test_zip_symlinks_are_refused(tmp_path, capsys):
    archive = write_zip(
        tmp_path / "link.zip", dog_entries(), symlinks={"dogImages/train/001.Affenpinscher/x.jpg": "/etc/passwd"}
    )
    assert_refused(capsys, run_step(archive, tmp_path / "out"), "symbolic link")
    assert_nothing_published(tmp_path / "out")


@pytest.mark.parametrize(
    ("links", "words"),
    [
        ({"dogImages/train/001.Affenpinscher/s.jpg": (tarfile.SYMTYPE, "/etc/passwd")}, ("symbolic link",)),
        ({"dogImages/train/001.Affenpinscher/h.jpg": (tarfile.LNKTYPE, "dogImages/train/x")}, ("hard link",)),
        ({"dogImages/fifo": (tarfile.FIFOTYPE, "")}, ("device or pipe",)),
    ],
)
def test_tar_links_and_devices_are_refused(tmp_path, capsys, links, words):
    archive = write_tar(tmp_path / "links.tar.gz", dog_entries(), links=links)
    assert_refused(capsys, run_step(archive, tmp_path / "out"), *words)
    assert_nothing_published(tmp_path / "out")


def test_tar_entries_that_escape_are_refused(tmp_path, capsys):
    archive = write_tar(tmp_path / "evil.tar", dog_entries() | {"../../evil.jpg": image_bytes("e")}, mode="w")
    assert_refused(capsys, run_step(archive, tmp_path / "a" / "b" / "out"), "outside")
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "a" / "evil.jpg").exists()


def test_fewer_than_two_classes_is_refused(tmp_path, capsys):
    archive = write_zip(tmp_path / "one.zip", imagefolder_entries({"cats": 2}) | {"README.txt": b"cats"})
    assert_refused(capsys, run_step(archive, tmp_path / "out"), "1 class", "'cats'", "at least two")
    assert_nothing_published(tmp_path / "out")


def test_a_class_without_usable_images_is_refused(tmp_path, capsys):
    entries = imagefolder_entries({"cats": 3, "dogs": 3}) | {"eels/readme.txt": b"no eels yet", "eels/empty.jpg": b""}
    archive = write_zip(tmp_path / "in.zip", entries)
    assert_refused(capsys, run_step(archive, tmp_path / "out"), "class 'eels' has no usable images", "2 files skipped")
    assert_nothing_published(tmp_path / "out")


@pytest.mark.parametrize(
    ("first", "second", "how"),
    [
        ("Cat", "cat", "one name in two cases: 'Cat' and 'cat'"),
        ("caf\u00e9", "cafe\u0301", "two Unicode spellings of one name: 'cafe\\u0301' and 'caf\\xe9'"),
    ],
)
def test_class_folders_that_are_one_name_up_to_case_or_unicode_form_are_refused(tmp_path, capsys, first, second, how):
    archive = write_zip(tmp_path / "in.zip", imagefolder_entries({first: 3, second: 3, "dogs": 3}))
    first_shown, second_shown = sorted([first, second])
    last = assert_refused(capsys, run_step(archive, tmp_path / "out"), how)
    assert last == (
        f"error: class folders {first_shown!r} and {second_shown!r} are one class ({how}); a case-insensitive file "
        "system would merge them: rename one, or move its images into the other"
    )
    assert_nothing_published(tmp_path / "out")


def test_an_empty_class_folder_is_refused(tmp_path, capsys):
    folder = write_folder(tmp_path / "in", imagefolder_entries({"cats": 3, "dogs": 3}))
    (folder / "eels").mkdir()
    assert_refused(capsys, run_step(folder, tmp_path / "out"), "class 'eels' has no usable images")


def test_an_unknown_layout_is_refused(tmp_path, capsys):
    archive = write_zip(tmp_path / "flat.zip", {f"img_{n}.jpg": image_bytes(str(n)) for n in range(4)})
    assert_refused(capsys, run_step(archive, tmp_path / "out"), "unknown layout", "no class folders")
    assert_nothing_published(tmp_path / "out")


def test_inputs_that_are_not_archives_are_refused(tmp_path, capsys):
    assert_refused(capsys, run_step(tmp_path / "missing.zip", tmp_path / "out"), "does not exist")
    (tmp_path / "notes.txt").write_text("hello")
    assert_refused(capsys, run_step(tmp_path / "notes.txt", tmp_path / "out"), "not a zip or tar archive")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    assert_refused(capsys, run_step(tmp_path / "broken.zip", tmp_path / "out"), "not a readable zip archive")
    whole = write_tar(tmp_path / "whole.tar.gz", dog_entries())
    (tmp_path / "cut.tar.gz").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_refused(capsys, run_step(tmp_path / "cut.tar.gz", tmp_path / "out"), "truncated")
    assert_nothing_published(tmp_path / "out")


def _run_script(input_path: Path, output_dir: Path, **popen: object) -> subprocess.Popen:
    """The step as the container runs it: its own process, with worker processes (the pool starts before the
    input is read)."""
    command = [sys.executable, str(REPO / "steps" / "preprocess.py"), "--input", str(input_path)]
    command += ["--output-dir", str(output_dir), "--workers", "2"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("fake.zip", b"hi\n", "not a readable zip archive"),  # `echo hi > f.zip`
        ("empty.zip", b"", "not a readable zip archive"),
        ("fake.tar.gz", b"hi\n", "not a readable tar archive"),
        ("holder/only.zip", b"PK\x03\x04 cut short", "not a readable zip archive"),  # a folder with one archive
    ],
)
@pytest.mark.slow
def test_a_refused_archive_prints_one_line_and_no_worker_traceback(tmp_path, name, content, words):
    source = tmp_path / name
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(content)
    process = _run_script(source.parent if name.startswith("holder/") else source, tmp_path / "out")
    _, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 2
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], stderr
    assert_nothing_published(tmp_path / "out")


def _default_sigint() -> None:
    """Ctrl-C as a terminal's: a suite started in the background (`nohup pytest &`) hands its children an ignored
    SIGINT, which Python keeps ignored, and the step would run to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGINT to the process group", "SIGTERM to the step"])
def test_a_stopped_run_publishes_nothing_prints_no_traceback_and_leaves_no_worker(tmp_path, stop):
    archive = write_zip(tmp_path / "many.zip", imagefolder_entries({"a": 300, "b": 300}, size=(64, 64)))
    process = _run_script(archive, tmp_path / "out", start_new_session=True, preexec_fn=_default_sigint)
    assert process.stdout is not None
    first = process.stdout.readline()  # "input many.zip (zip): layout ..." : the workers are decoding now
    assert first.startswith("input "), first
    if stop.startswith("SIGINT"):
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    else:
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIG")
    assert_nothing_published(tmp_path / "out")
    # Every process of the step's group ends within seconds (multiprocessing's resource tracker exits once the
    # step's end closes its pipe).
    deadline = time.monotonic() + 10
    while (left := _live_processes_in_group(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]


def _live_processes_in_group(group: int) -> list[int]:
    """Processes of the group that are not zombies (an exited worker may wait a moment to be reaped)."""
    live = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[2]) == group and fields[0] != "Z":
            live.append(int(stat_file.parent.name))
    return live


def test_bad_parameters_are_refused(tmp_path, capsys):
    archive = write_zip(tmp_path / "in.zip", dog_entries())
    assert_refused(
        capsys,
        run_step(archive, tmp_path / "out", "--valid-fraction", "0.6", "--test-fraction", "0.5"),
        "leave a share",
    )
    assert_refused(capsys, run_step(archive, tmp_path / "out", "--image-size", "0"), "--image-size")
    assert_refused(capsys, run_step(archive, tmp_path / "out", "--jpeg-quality", "101"), "--jpeg-quality")


def test_a_failed_run_leaves_the_earlier_output_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_step(write_zip(tmp_path / "good.zip", dog_entries()), out) == 0
    before = output_files(out)
    bad = write_zip(tmp_path / "bad.zip", dog_entries(classes=("001.A", "002.B")) | {"../x.jpg": b"x"})
    assert_refused(capsys, run_step(bad, out), "outside")
    assert output_files(out) == before
    assert [path.name for path in out.iterdir() if path.name.startswith(".")] == []


def test_output_folders_with_foreign_files_are_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "thesis.tex").write_text("precious")
    archive = write_zip(tmp_path / "in.zip", dog_entries())
    assert_refused(capsys, run_step(archive, out), "did not write")
    assert (out / "train" / "thesis.tex").read_text() == "precious"


def test_a_rerun_replaces_the_earlier_output(tmp_path):
    out = tmp_path / "out"
    assert run_step(write_zip(tmp_path / "a.zip", dog_entries(classes=("001.A", "002.B"))), out) == 0
    assert run_step(write_zip(tmp_path / "b.zip", dog_entries(classes=("001.X", "002.Y"))), out) == 0
    assert sorted(path.name for path in (out / "train").iterdir() if path.is_dir()) == ["001.X", "002.Y"]


# --- determinism, manifest, leakage -------------------------------------------------------------------------------


def test_same_input_and_seed_give_identical_outputs_whatever_the_workers(tmp_path):
    entries = imagefolder_entries({"a": 6, "b": 5, "c": 4}, size=(40, 24)) | {"a/broken.jpg": b"\xff\xd8broken"}
    archive = write_zip(tmp_path / "in.zip", entries)
    assert run_step(archive, tmp_path / "one", "--image-size", "16", workers=1) == 0
    assert run_step(archive, tmp_path / "two", "--image-size", "16", workers=2) == 0
    assert output_files(tmp_path / "one") == output_files(tmp_path / "two")


def test_manifest_contents(tmp_path):
    entries = dog_entries() | {"dogImages/train/001.Affenpinscher/bad.jpg": b"not a jpeg"}
    archive = write_zip(tmp_path / "dogs.zip", entries)
    args = ("--image-size", "64", "--seed", "3", "--max-image-pixels", "123456", "--jpeg-quality", "80")
    assert run_step(archive, tmp_path / "out", *args) == 0
    text = (tmp_path / "out" / "train" / "manifest.json").read_text()
    manifest = json.loads(text)
    assert str(tmp_path) not in text  # no absolute or temporary paths
    assert manifest["input"] == {
        "name": "dogs.zip",
        "format": "zip",
        "bytes": archive.stat().st_size,
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
    }
    assert manifest["parameters"] == {
        "image_size": 64,
        "valid_fraction": 0.1,
        "test_fraction": 0.1,
        "seed": 3,
        "max_image_pixels": 123456,
        "jpeg_quality": 80,
    }
    assert manifest["classes"] == ["001.Affenpinscher", "002.Afghan_hound"]
    assert manifest["totals"] == {"train": 6, "valid": 2, "test": 2}
    assert manifest["skipped"] == [
        {"path": "dogImages/train/001.Affenpinscher/bad.jpg", "reason": "not an image (no image format recognised)"}
    ]
    assert manifest["duplicates_removed"] == []
    assert manifest["classes_missing_from_split"] == {}


def test_identical_images_never_sit_in_two_splits(tmp_path):
    entries = dog_entries(per_split={"train": 3, "valid": 2, "test": 2})
    leaked = entries["dogImages/train/001.Affenpinscher/Affenpinscher_00001.jpg"]
    entries["dogImages/test/002.Afghan_hound/copy.jpg"] = leaked  # a copy in another split (and class)
    entries["dogImages/valid/001.Affenpinscher/Affenpinscher_00004.jpg"] = entries[
        "dogImages/test/001.Affenpinscher/Affenpinscher_00006.jpg"
    ]  # valid and test share an image: test loses it
    entries["dogImages/train/002.Afghan_hound/twin.jpg"] = leaked  # the same split twice is not a leak
    archive = write_zip(tmp_path / "leaky.zip", entries)
    out = tmp_path / "out"
    assert run_step(archive, out) == 0
    manifest = read_json(out / "train" / "manifest.json")
    assert manifest["duplicates_removed"] == [
        {
            "path": "dogImages/test/001.Affenpinscher/Affenpinscher_00006.jpg",
            "class": "001.Affenpinscher",
            "split": "test",
            "same_as": "dogImages/valid/001.Affenpinscher/Affenpinscher_00004.jpg",
            "same_as_split": "valid",
        },
        {
            "path": "dogImages/test/002.Afghan_hound/copy.jpg",
            "class": "002.Afghan_hound",
            "split": "test",
            "same_as": "dogImages/train/001.Affenpinscher/Affenpinscher_00001.jpg",
            "same_as_split": "train",
        },
    ]
    digests = {
        split: {hashlib.sha256(path.read_bytes()).hexdigest() for path in image_files(out, split)}
        for split in contract.SPLITS
    }
    assert not digests["train"] & digests["valid"]
    assert not digests["train"] & digests["test"]
    assert not digests["valid"] & digests["test"]
    assert (out / "train" / "002.Afghan_hound" / "twin.jpg").exists()
    assert manifest["counts"]["test"] == {"001.Affenpinscher": 1, "002.Afghan_hound": 2}


def test_a_class_missing_from_a_split_is_reported(tmp_path, capsys):
    entries = dog_entries(classes=("001.A",), per_split={"train": 2, "valid": 1, "test": 1})
    entries |= dog_entries(classes=("002.B",), per_split={"train": 2, "test": 1})
    assert run_step(write_zip(tmp_path / "in.zip", entries), tmp_path / "out") == 0
    manifest = read_json(tmp_path / "out" / "valid" / "manifest.json")
    assert manifest["classes_missing_from_split"] == {"valid": ["002.B"]}
    assert "no images in valid" in capsys.readouterr().err
    assert read_json(tmp_path / "out" / "valid" / "labels.json") == ["001.A", "002.B"]


def test_target_size_matches_torchvision_resize():
    from torchvision import transforms

    resize = transforms.Resize(256)
    for size in [(300, 300), (2000, 1500), (1500, 2000), (333, 1000), (257, 10000), (1001, 257)]:
        expected = resize(Image.new("RGB", size)).size
        assert preprocess.target_size(*size, 256) == expected
    assert preprocess.target_size(200, 300, 256) is None  # never enlarged


def test_output_names_are_unique_whatever_the_case_and_nested_folders_are_flattened(tmp_path):
    entries = imagefolder_entries({"cats": 3, "dogs": 3}) | {
        "cats/A.JPG": image_bytes("upper"),
        "cats/a.jpg": image_bytes("lower"),
        "cats/a.png": image_bytes("png", image_format="PNG"),
        "cats/kittens/small.jpg": image_bytes("nested"),
    }
    archive = write_zip(tmp_path / "in.zip", entries)
    assert run_step(archive, tmp_path / "out", "--valid-fraction", "0", "--test-fraction", "0") == 0
    names = sorted(path.name for path in (tmp_path / "out" / "train" / "cats").iterdir())
    assert names == ["A.jpg", "a_2.jpg", "a_3.jpg", "img_000.jpg", "img_001.jpg", "img_002.jpg", "kittens__small.jpg"]
