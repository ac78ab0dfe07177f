"""The serving wheelhouse: ONNX Runtime and the MLflow client as wheels, for containers that lack them and may have
no network.

Neither image the int8 path runs in has ONNX Runtime: the SageMaker PyTorch training image that runs the Evaluate
step (Python 3.12), nor AWS's Ray Serve inference image (Python 3.13). Jobs and endpoints may run under network
isolation, so nothing may be downloaded there. This command downloads the wheels once, on a machine that can reach
the package index, for those images' Python and platform::

    python -m pipelines.run wheelhouse --output wheelhouse/
    aws s3 sync wheelhouse/ s3://<bucket>/<pipeline>/wheelhouse/
    python -m pipelines.run upsert --serving-wheels-uri s3://<bucket>/<pipeline>/wheelhouse/ ...

Layout (what ``steps/evaluate.py --wheels`` reads):

- ``evaluation/*.whl``: onnx, onnxruntime and what they need beyond the training image, installed by the Evaluate
  step into a scratch folder (no index, no dependency resolution) when the image lacks them;
- ``tracking/*.whl`` and ``tracking/requirements.txt``: the MLflow client (``tracking.JOB_REQUIREMENTS``) and every
  package it needs, resolved for the training image, plus the training source directory's own requirements
  (TensorBoard). With ``--mlflow-tracking-arn`` the folder is the Tune and Train jobs' ``tracking`` channel: their
  ``requirements.txt`` then installs with ``--no-index --find-links /opt/ml/input/data/tracking``, taking from the
  wheels only what the image lacks. The Evaluate step installs the client from it into a scratch folder. The
  requirements carry the training image's Python and machine as a marker, so another Python skips them (and the
  job goes on untracked, saying so);
- ``serving/*.whl`` and ``serving/requirements.txt``: onnxruntime (and flatbuffers) for the Ray Serve image. The
  Evaluate step copies them into ``code/wheels/`` of an artifact it serves as int8 and appends the requirements to
  ``code/requirements.txt``: ``--no-index --find-links wheels`` and each wheel pinned with a marker for the
  image's Python and machine, so a container on another Python skips them (and serves fp32, saying why) instead
  of failing to start. About 28 MB more in the artifact.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoints import tracking
from pipelines import packaging
from pipelines.util.errors import CommandError

# manylinux tags the images' glibc accepts (Amazon Linux 2023 and Ubuntu 22.04: glibc >= 2.34), newest first.
X86_64_LINUX = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
ONNXRUNTIME = "onnxruntime==1.32.0"
FLATBUFFERS = "flatbuffers==25.12.19"


@dataclass(frozen=True)
class WheelTarget:
    """Wheels for one container: its folder in the wheelhouse, its Python and platforms, what it needs."""

    folder: str
    python_version: str  # "3.13"
    platforms: tuple[str, ...]
    requirements: tuple[str, ...]
    machine: str = "x86_64"
    writes_requirements: bool = False  # a requirements.txt for the artifact's code/ folder
    with_dependencies: bool = False  # pip resolves what the requirements need (for the target), not just them

    def marker(self) -> str:
        return packaging.requirement_marker(self.python_version, self.machine)

    def downloads(self) -> tuple[str, ...]:
        """What ``pip download`` is asked for."""
        return self.requirements

    def requirements_text(self) -> str:
        """``code/requirements.txt`` lines: these wheels from ``code/wheels``, never from an index."""
        lines = [
            "# ONNX Runtime for the int8 network, from the wheels in code/wheels: no package index is asked. Another",
            f"# Python than {self.python_version} skips them and serves fp32 (the log says why).",
            "--no-index",
            "--find-links wheels",
            *(f"{requirement} ; {self.marker()}" for requirement in self.requirements),
        ]
        return "\n".join(lines) + "\n"


# The Ray Serve image (Python 3.13) has numpy, packaging and protobuf, which onnxruntime needs besides flatbuffers.
SERVING = WheelTarget("serving", "3.13", X86_64_LINUX, (ONNXRUNTIME, FLATBUFFERS), writes_requirements=True)
# The training image (Python 3.12) has numpy and typing_extensions; quantisation needs onnx and what it imports.
EVALUATION = WheelTarget(
    "evaluation",
    "3.12",
    X86_64_LINUX,
    (ONNXRUNTIME, FLATBUFFERS, "onnx==1.23.2", "ml_dtypes==0.6.0", "protobuf==6.33.6"),
)


@dataclass(frozen=True)
class TrackingTarget(WheelTarget):
    """The MLflow client for the training image, with every package it needs, and the source directory's own
    requirements: with a wheelhouse a training job's whole requirements.txt installs with no index."""

    also: tuple[str, ...] = ()  # fetched beside the requirements (with what they need), not written in the file

    def downloads(self) -> tuple[str, ...]:
        return (*self.requirements, *self.also)

    def requirements_text(self) -> str:
        """``tracking/requirements.txt``: the client's pins with the image's marker (the installer names the folder)."""
        return packaging.tracking_requirements_text(None, self.marker(), self.requirements)


# The pins have one owner, tracking.JOB_REQUIREMENTS; pip resolves their dependencies for the training image.
TRACKING = TrackingTarget(
    packaging.TRACKING_WHEELS_FOLDER,
    packaging.TRAINING_IMAGE_PYTHON,
    X86_64_LINUX,
    tracking.JOB_REQUIREMENTS,
    machine=packaging.TRAINING_IMAGE_MACHINE,
    writes_requirements=True,
    with_dependencies=True,
    also=packaging.training_requirements(),
)
TARGETS = (EVALUATION, SERVING, TRACKING)


class WheelhouseError(RuntimeError):
    """pip could not fetch a wheel; the message carries pip's reason."""


def download(target: WheelTarget, folder: Path, find_links: Path | None = None) -> list[Path]:
    """``pip download`` of the target's wheels (binary only; dependencies only ``with_dependencies``) into
    ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        *([] if target.with_dependencies else ["--no-deps"]),
        "--implementation",
        "cp",
        "--python-version",
        target.python_version,
        *(f"--platform={platform}" for platform in target.platforms),
        "--dest",
        str(folder),
    ]
    if find_links is not None:  # an offline source (tests, a mirror on disk)
        command += ["--no-index", "--find-links", str(find_links)]
    also = " and what they need" if target.with_dependencies else ""
    print(f"{target.folder}: {', '.join(target.downloads())}{also} for Python {target.python_version}", flush=True)
    result = subprocess.run([*command, *target.downloads()], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise WheelhouseError(f"pip could not download the {target.folder} wheels: {result.stderr.strip()[-800:]}")
    if target.writes_requirements:
        (folder / "requirements.txt").write_text(target.requirements_text(), encoding="utf-8")
    return sorted(folder.glob("*.whl"))


def build(output: Path, targets: tuple[WheelTarget, ...] = TARGETS, find_links: Path | None = None) -> list[Path]:
    """Every target's wheels under ``output/<target folder>``; returns the wheel files."""
    return [wheel for target in targets for wheel in download(target, output / target.folder, find_links)]


def cmd_wheelhouse(args: argparse.Namespace) -> int:
    try:
        wheels = build(Path(args.output), find_links=args.find_links)
    except WheelhouseError as error:
        raise CommandError(str(error)) from error
    size = sum(wheel.stat().st_size for wheel in wheels) / 1e6
    print(
        f"wrote {len(wheels)} wheels ({size:.0f} MB) under {args.output}; copy the folder to S3 and pass its URI "
        "as --serving-wheels-uri to definition/upsert"
    )
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``wheelhouse`` to ``python -m pipelines.run``."""
    parser = subparsers.add_parser(
        "wheelhouse",
        help="download ONNX Runtime wheels for the evaluation and serving images (int8 with no network there) "
        "and the MLflow client for the training image (tracking with no package index)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", "-o", type=Path, required=True, help="folder to write the wheelhouse into")
    parser.add_argument(
        "--find-links", type=Path, default=None, help="take the wheels from this folder instead of the package index"
    )
    parser.set_defaults(func=cmd_wheelhouse)
