"""Every file a command writes goes through one writer: whole or not at all, never through a link planted at a
temporary name, and a folder, a missing folder or a full disk is refused in one line with nothing left behind.
Also the commands that need AWS values or credentials, refused in one line when they are missing."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.run import main
from pipelines.util import fsutil

ROLE = "arn:aws:iam::123456789012:role/pipeline"
BUILD = ["--region", "eu-west-1", "--role", ROLE, "--bucket", "bucket"]
ACCOUNT = ["--region", "eu-west-1", "--account-id", "123456789012"]


@pytest.fixture()
def quick_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    """``definition`` without the SDK's build: what is under test here is how it writes its file."""
    from pipelines.cli import sagemaker

    monkeypatch.setattr(sagemaker, "build_from_args", lambda args, session, offline: (None, '{"Version": "x"}'))


# command -> argv writing to PATH
COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "definition": lambda path: ["definition", *BUILD, "--output", str(path)],
    "iam": lambda path: ["iam", "deploy-policy", "--role", ROLE, *ACCOUNT, "--output", str(path)],
    "bootstrap": lambda path: ["bootstrap", "--print-template", str(path)],
    "demo-data": lambda path: ["demo-data", str(path), "--per-class-limit", "1", "--image-size", "8"],
}
# the temporary names the commands wrote through before their rename
OLD_TEMPORARIES = ("{}.tmp", ".{}.partial")


def _argv(command: str, path: Path) -> list[str]:
    return COMMANDS[command](path)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_link_planted_at_a_temporary_name_is_not_followed(
    command: str, tmp_path: Path, quick_definition: None, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    output = tmp_path / "out" / "result"
    output.parent.mkdir()
    for temporary in OLD_TEMPORARIES:
        (output.parent / temporary.format(output.name)).symlink_to(victim)

    assert main(_argv(command, output)) == 0, capsys.readouterr().err
    assert victim.read_text() == "precious"
    assert output.is_file() and not output.is_symlink() and output.stat().st_size > 0
    assert sorted(path.name for path in output.parent.iterdir() if not path.is_symlink()) == ["result"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("place", ["a folder", "under a file", "in a missing folder"])
def test_an_output_path_that_cannot_take_a_file_is_refused_in_one_line_leaving_nothing(
    command: str, place: str, tmp_path: Path, quick_definition: None, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    if place == "a folder":
        output = base / "dir"
        output.mkdir()
    elif place == "under a file":
        (base / "file").write_text("a file")
        output = base / "file" / "out"
    else:
        output = base / "missing" / "out"
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))

    assert main(_argv(command, output)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(output) in err[0], err
    assert "is a folder" in err[0] if place == "a folder" else "create the folder" in err[0]
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before  # nothing left behind


def test_a_full_disk_leaves_the_previous_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quick_definition: None, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "definition.json"
    output.write_text("the previous definition")
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, descriptor: int, *args: object, **kwargs: object) -> None:
            self.stream = real_fdopen(descriptor, *args, **kwargs)

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.stream.close()

    monkeypatch.setattr(fsutil.os, "fdopen", FullDisk)
    assert main(["definition", *BUILD, "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output: cannot write {output}: No space left on device; it was left as it was"]
    assert output.read_text() == "the previous definition"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["definition.json"]


def test_without_replace_a_file_goes_in_place_only_where_nothing_is(tmp_path: Path) -> None:
    """atomic_output(replace=False): what appeared at the path meanwhile (a file, a link) is kept, the caller
    hears FileExistsError, and no temporary is left; where nothing is, the bytes appear whole."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "link").symlink_to(victim)
    (tmp_path / "file").write_text("first")
    for name in ("link", "file"):
        with pytest.raises(FileExistsError), fsutil.atomic_output(tmp_path / name, replace=False) as stream:
            stream.write(b"second")
    assert victim.read_text() == "precious" and (tmp_path / "file").read_text() == "first"
    with fsutil.atomic_output(tmp_path / "new", replace=False) as stream:
        stream.write(b"whole")
    assert (tmp_path / "new").read_bytes() == b"whole"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file", "link", "new", "victim.txt"]


def test_the_tracking_template_is_copied_through_the_projects_one_write(tmp_path: Path) -> None:
    """A new store is the template's bytes; an existing store is kept; a link planted at a temporary name of the
    store's folder (the helper's first version wrote a fixed one) is not followed."""
    from pipelines.local.tracking_store import place_template

    template = tmp_path / "template.db"
    template.write_bytes(b"migrated tables")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / ".mlflow.db.partial").symlink_to(victim)
    place_template(template, f"sqlite:///{runs / 'mlflow.db'}")
    assert (runs / "mlflow.db").read_bytes() == b"migrated tables" and victim.read_text() == "precious"
    (runs / "mlflow.db").write_bytes(b"a user's runs")
    place_template(template, f"sqlite:///{runs / 'mlflow.db'}")
    assert (runs / "mlflow.db").read_bytes() == b"a user's runs"
    place_template(template, f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")  # MLflow names the folder later
    assert not (tmp_path / "missing").exists()


# --- values and credentials -----------------------------------------------------------------------------------


@pytest.fixture()
def no_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No region, no credentials anywhere (environment, files, instance metadata)."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name in ("SAGEMAKER_PIPELINE_ROLE_ARN", "ARTIFACT_BUCKET"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.slow
def test_definition_without_flags_names_every_missing_value_at_once(
    no_aws: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "definition.json"
    assert main(["definition", "--output", str(output)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: 3 value(s) missing: ")
    for named in ("--region", "--role", "--bucket"):
        assert named in line
    assert not output.exists()
    assert main(["upsert", "--region", "eu-west-1", "--bucket", "b"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: 1 value(s) missing: the pipeline's IAM role ARN (--role")


def test_iam_pipeline_policy_without_credentials_asks_for_the_account_id(
    no_aws: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "policy.json"
    argv = ["iam", "pipeline-policy", "--bucket", "b", "--region", "eu-west-1", "--output", str(output)]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot ask AWS for the account ID (") and line.endswith("pass --account-id")
    assert not output.exists()


@pytest.mark.slow
def test_endpoint_test_of_a_sagemaker_endpoint_without_credentials_is_one_line(
    no_aws: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["endpoint-test", "--test-dir", str(tmp_path), "--endpoint-name", "imgclf", "--region", "eu-west-1"]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: AWS call failed: Unable to locate credentials")


@pytest.mark.slow
def test_upsert_without_credentials_is_one_line_and_sends_no_telemetry(
    no_aws: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sagemaker.telemetry import telemetry_logging

    sent = []

    def unreachable(*args: object, **kwargs: object) -> None:  # what the SDK's sender does offline: it fails loudly
        sent.append(args)
        raise ConnectionError("telemetry endpoint out of reach")

    monkeypatch.setattr(telemetry_logging, "_send_telemetry_request", unreachable)
    assert main(["upsert", *BUILD, "--skip-deploy-wiring"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if "sagemaker.config INFO" not in line]
    assert lines == ["error: AWS call failed: Unable to locate credentials"], captured.err
    assert sent == [] and "Traceback" not in captured.out + captured.err
