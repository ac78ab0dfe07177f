"""The serving wheelhouse: ONNX Runtime as wheels, for containers that lack it and may have no network.

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

    def marker(self) -> str:
        return f'python_version == "{self.python_version}" and platform_machine == "{self.machine}"'

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
TARGETS = (EVALUATION, SERVING)


class WheelhouseError(RuntimeError):
    """pip could not fetch a wheel; the message carries pip's reason."""


def download(target: WheelTarget, folder: Path, find_links: Path | None = None) -> list[Path]:
    """``pip download`` of the target's wheels (binary only, no dependencies) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--no-deps",
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
    print(f"{target.folder}: {', '.join(target.requirements)} for Python {target.python_version}", flush=True)
    result = subprocess.run([*command, *target.requirements], capture_output=True, text=True, check=False)
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
        help="download ONNX Runtime wheels for the evaluation and serving images (int8 with no network there)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", "-o", type=Path, required=True, help="folder to write the wheelhouse into")
    parser.add_argument(
        "--find-links", type=Path, default=None, help="take the wheels from this folder instead of the package index"
    )
    parser.set_defaults(func=cmd_wheelhouse)
