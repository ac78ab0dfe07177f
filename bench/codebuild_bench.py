"""Install and test time of the CodeBuild build, this buildspec.yml against a baseline one, as CodeBuild runs them.

Approximates a CodeBuild ``general1.medium`` build on this machine: for each buildspec, a clean copy of the
repository at that version, a fresh virtual environment with nothing installed (no system site packages), an empty
pip cache, no pip configuration but PyPI, then the buildspec's ``install`` commands and its ``pre_build`` commands
(the tests) in a shell, timed. For this buildspec it also times downloading the same packages alone (``pip
download`` into an empty folder): the most that a pip cache kept between builds could save.

The build phase (upsert, start) needs AWS and is not run. PyTorch's CPU wheel index is used as is when it can be
reached; where it cannot (``--cpu-wheels DIR``), the index's torch wheel is taken from DIR instead (the same
``+cpu`` file the index serves), with torchvision from PyPI for the install, and this build's tests then run in the
baseline's environment with this tree installed into it (PyPI's torchvision does not load with the ``+cpu`` torch).
Prints a line per phase and as its last line
``CodeBuild install+test s: <this> vs baseline <baseline> ratio=<baseline / this>`` (above 1: this build is faster).

    python bench/codebuild_bench.py                                  # baseline: buildspec.yml of main
    python bench/codebuild_bench.py --baseline-ref HEAD~3 --cpu-wheels /opt/wheels
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _copy_working_tree(target: Path) -> None:
    """The files git tracks or would track (ignored ones left out), as they are now."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _copy_ref(ref: str, target: Path) -> None:
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=REPO, check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")


def _index_reachable(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/torch/", timeout=10):
            return True
    except OSError:
        return False


def _stand_in_for_cpu_index(command: str, wheels: Path) -> str:
    """``pip install --index-url <CPU index> torch torchvision`` -> the same wheels from a folder."""
    torch_wheels = sorted(wheels.glob("torch-*+cpu-*.whl"))
    if not torch_wheels:
        raise SystemExit(f"no torch-*+cpu-*.whl in {wheels}")
    version = re.match(r"torch-([^-]+)\+cpu", torch_wheels[-1].name).group(1)
    major, minor = (int(part) for part in version.split(".")[:2])
    torchvision = f"0.{minor + 15}.*" if major == 2 else ""  # torch 2.N pairs with torchvision 0.(N+15)
    return command.replace(
        f"--index-url {CPU_INDEX} torch torchvision",
        f"--find-links {wheels} torch=={version}+cpu torchvision=={torchvision}",
    )


def _environment(venv: Path, cache: Path) -> dict[str, str]:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))
    }
    environment.update(
        PATH=f"{venv / 'bin'}:{os.environ['PATH']}",
        VIRTUAL_ENV=str(venv),
        PIP_CONFIG_FILE=os.devnull,  # no local mirrors, find-links or constraints: PyPI only, as on CodeBuild
        PIP_CACHE_DIR=str(cache),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    return environment


def _run_phase(commands: list[str], cwd: Path, environment: dict[str, str], log: Path, what: str) -> tuple[float, int]:
    start = time.perf_counter()
    code = 0
    with log.open("a") as handle:
        for command in commands:
            handle.write(f"\n$ {command}\n")
            handle.flush()
            code = subprocess.run(
                ["bash", "-c", command], cwd=cwd, env=environment, stdout=handle, stderr=subprocess.STDOUT, check=False
            ).returncode
            if code:
                break
    seconds = time.perf_counter() - start
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"  {what}: {seconds:.0f} s (exit {code}; load average {load})", flush=True)
    return seconds, code


def _size(path: Path) -> float:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) / 2**20


def run_variant(
    name: str, tree: Path, spec: dict, work: Path, cpu_wheels: Path | None, test_venv: Path | None = None
) -> dict[str, float]:
    """Install into a fresh environment (timed), then run the tests (timed) there, or in ``test_venv``."""
    print(f"{name}:", flush=True)
    log = work / f"{name}.log"
    install = spec["phases"]["install"]["commands"]
    if cpu_wheels is not None:
        install = [_stand_in_for_cpu_index(command, cpu_wheels) for command in install]
    venv = work / f"{name}-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    environment = _environment(venv, work / f"{name}-pip-cache")
    results = {}
    results["install"], code = _run_phase(install, tree, environment, log, "install")
    if code:
        raise SystemExit(f"{name}: install failed, see {log}")
    print(f"    environment {_size(venv):.0f} MiB", flush=True)
    if test_venv is not None:
        environment = _environment(test_venv, work / f"{name}-pip-cache")
        _run_phase(
            ['python -m pip install -e ".[dev]"'], tree, environment, log, f"(untimed) this tree into {test_venv.name}"
        )
    results["tests"], results["tests_exit"] = _run_phase(
        spec["phases"].get("pre_build", {}).get("commands", []), tree, environment, log, "tests"
    )
    return results


def download_share(name: str, tree: Path, spec: dict, work: Path, cpu_wheels: Path | None) -> None:
    """Time ``pip download`` of what the install commands install, into an empty folder with an empty cache: one
    resolution of everything the install commands name (torch and torchvision from where the first one takes them)."""
    folder = work / f"{name}-downloads"
    shutil.rmtree(folder, ignore_errors=True)
    commands = [command for command in spec["phases"]["install"]["commands"] if "--upgrade pip" not in command]
    if cpu_wheels is not None:
        commands = [_stand_in_for_cpu_index(command, cpu_wheels) for command in commands]
    first, *rest = commands
    combined = first.replace("pip install", f"pip download -d {folder}").replace("--index-url", "--extra-index-url")
    for command in rest:
        combined += " " + command.split("pip install", 1)[1].replace(" -e ", " ")
    venv = work / f"{name}-venv"
    environment = _environment(venv, work / f"{name}-download-cache")
    shutil.rmtree(work / f"{name}-download-cache", ignore_errors=True)
    _, code = _run_phase([combined], tree, environment, work / f"{name}.log", "downloads alone")
    if not code:
        print(f"    {_size(folder):.0f} MiB downloaded: at most what a pip cache kept between builds saves", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default="main", help="git ref of the baseline buildspec (default: main)")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "codebuild", help="scratch folder")
    parser.add_argument(
        "--cpu-wheels",
        type=Path,
        default=None,
        help="folder of torch-*+cpu wheels standing in for PyTorch's CPU index (default: the index itself)",
    )
    parser.add_argument(
        "--downloads-only",
        action="store_true",
        help="time the downloads of this buildspec's install alone (needs the work folder of an earlier run)",
    )
    args = parser.parse_args()
    if args.cpu_wheels is None and not _index_reachable(CPU_INDEX):
        raise SystemExit(f"{CPU_INDEX} cannot be reached from here: pass --cpu-wheels DIR")
    if args.downloads_only:
        tree = args.work / "this-tree"
        download_share("this", tree, yaml.safe_load((tree / "buildspec.yml").read_text()), args.work, args.cpu_wheels)
        return 0
    shutil.rmtree(args.work, ignore_errors=True)
    trees = {"baseline": args.work / "baseline-tree", "this": args.work / "this-tree"}
    for tree in trees.values():
        tree.mkdir(parents=True)
    _copy_ref(args.baseline_ref, trees["baseline"])
    _copy_working_tree(trees["this"])
    specs = {name: yaml.safe_load((tree / "buildspec.yml").read_text()) for name, tree in trees.items()}
    baseline = run_variant("baseline", trees["baseline"], specs["baseline"], args.work, None)
    # PyPI's Linux torchvision is built against CUDA torch and does not load with the +cpu torch: with the stand-in
    # wheels, this build's tests run in the baseline's environment (PyPI's CUDA builds, on this CPU) with this
    # tree installed into it, which if anything slows them (the CUDA build's libraries load with every torch import).
    test_venv = args.work / "baseline-venv" if args.cpu_wheels is not None else None
    this = run_variant("this", trees["this"], specs["this"], args.work, args.cpu_wheels, test_venv)
    download_share("this", trees["this"], specs["this"], args.work, args.cpu_wheels)
    for name, result in (("baseline", baseline), ("this", this)):
        if result["tests_exit"]:
            print(f"note: the {name} tests exited {result['tests_exit']:.0f} (see {args.work / (name + '.log')})")
    print(f"install alone s: {this['install']:.0f} vs baseline {baseline['install']:.0f}")
    base_total, this_total = baseline["install"] + baseline["tests"], this["install"] + this["tests"]
    print(
        f"CodeBuild install+test s: {this_total:.0f} vs baseline {base_total:.0f} ratio={base_total / this_total:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
