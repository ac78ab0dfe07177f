"""The deploy settings table (``SETTINGS`` in steps/deploy.py) and everything made from it.

One row per setting makes the DeploySettings fields, the flags of ``upsert``, ``deploy`` and ``iam deploy-policy``,
the function's environment, its parsing and the settings table of docs/deployment.md. These tests take the settings
from flags to the environment to the settings and back, with a bad value named at each hop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipelines import config
from pipelines.aws import deploy_infra
from pipelines.run import build_parser
from pipelines.util.errors import CommandError
from steps import deploy

GROUP = config.MODEL_PACKAGE_GROUP
ROLE = "arn:aws:iam::123456789012:role/sagemaker-execution"
DEPLOYMENT_DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
TABLE_START = "<!-- deploy-settings-table: made from SETTINGS in steps/deploy.py -->"
TABLE_END = "<!-- /deploy-settings-table -->"

# A value other than the default for every setting with a flag of its own: an instance-backed endpoint with
# everything on, then a serverless one (the two kinds exclude some of each other's settings).
INSTANCES = {
    "endpoint_name": "Image-Classifier",
    "endpoint_instance_type": "ml.c5.xlarge",
    "endpoint_instance_count": 2,
    "data_capture_s3_uri": "s3://capture-bucket/endpoint/",
    "data_capture_percent": 20,
    "rollback_alarm_names": ("imgclf-5xx", "imgclf-latency"),
    "traffic_routing": "CANARY",
    "traffic_step_percent": 25,
    "traffic_wait_seconds": 600,
    "termination_wait_seconds": 120,
    "max_execution_timeout_seconds": 3600,
    "min_capacity": 1,
    "max_capacity": 4,
    "target_invocations_per_instance": 120.5,
    "scale_in_cooldown_seconds": 600,
    "scale_out_cooldown_seconds": 30,
    "endpoint_wait_seconds": 120,
    "endpoint_poll_seconds": 10,
    "log_level": "DEBUG",
}
SERVERLESS = {"serverless_memory_mb": 2048, "serverless_max_concurrency": 20, "traffic_routing": "ALL_AT_ONCE"}


def _flags(values: dict[str, Any]) -> list[str]:
    argv = []
    for name, value in values.items():
        setting = deploy.SETTINGS_BY_NAME[name]
        text = setting.format(value)
        argv += [setting.flag_name, text.lower() if setting.kind == deploy.CHOICE else text]  # choices: any case
    return argv


def _subcommand(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def _upsert(*argv: str) -> argparse.Namespace:
    return _subcommand().parse_args(["upsert", *argv])


# --- the table itself -----------------------------------------------------------------------------------------


def test_the_settings_are_the_rows_of_the_table() -> None:
    fields = dataclasses.fields(deploy.DeploySettings)
    assert [field.name for field in fields] == [setting.name for setting in deploy.SETTINGS]
    for field, setting in zip(fields, deploy.SETTINGS, strict=True):
        assert field.default == (dataclasses.MISSING if setting.required else setting.default), setting.name
    assert len({setting.env for setting in deploy.SETTINGS}) == len(deploy.SETTINGS)  # one variable each


@pytest.mark.parametrize("setting", deploy.SETTINGS, ids=lambda setting: setting.name)
def test_each_default_passes_its_own_checks_and_reads_back(setting: deploy.Setting) -> None:
    if setting.required:
        with pytest.raises(ValueError, match="is not set"):
            setting.parse("")
        return
    assert setting.parse("") == setting.default
    if setting.default not in (None, "", ()):
        assert setting.parse(setting.format(setting.default)) == setting.default
    assert setting.help and setting.describe() and setting.describe_default()


def test_the_examples_cover_every_flag_of_the_table() -> None:
    own_flags = {setting.name for setting in deploy.SETTINGS if setting.has_own_flag}
    assert own_flags == set(INSTANCES) | set(SERVERLESS)
    for name, value in {**INSTANCES, **SERVERLESS}.items():
        assert value != deploy.SETTINGS_BY_NAME[name].default or name == "traffic_routing", name


# --- flags -> environment -> settings --------------------------------------------------------------------------


@pytest.mark.parametrize("values", [INSTANCES, SERVERLESS], ids=["instances", "serverless"])
def test_settings_round_trip_from_flags_to_environment_to_settings(values: dict[str, Any]) -> None:
    args = _upsert(*_flags(values))
    environment, settings = deploy_infra.settings_from_args(args, GROUP, ROLE)

    for name, value in values.items():
        assert getattr(settings, name) == value, name
    assert (settings.model_package_group, settings.execution_role_arn) == (GROUP, ROLE)
    # The function parses its environment into exactly the settings upsert checked ...
    assert deploy.DeploySettings.from_env(environment) == settings
    # ... and every variable is the setting's own, by name, in the function's text form.
    for setting in deploy.SETTINGS:
        if setting.env in environment:
            assert setting.parse(environment[setting.env]) == getattr(settings, setting.name)
    if settings.serverless:  # a serverless endpoint has no instance type, and no instance-only settings
        assert {"INSTANCE_TYPE", "INSTANCE_COUNT", "TARGET_INVOCATIONS_PER_INSTANCE"}.isdisjoint(environment)
    else:
        assert "SERVERLESS_MAX_CONCURRENCY" not in environment


def test_flags_left_out_give_the_functions_defaults() -> None:
    environment, settings = deploy_infra.settings_from_args(_upsert(), GROUP, ROLE)
    assert settings == deploy.DeploySettings(model_package_group=GROUP, execution_role_arn=ROLE)
    assert deploy.DeploySettings.from_env(environment) == settings
    # A Namespace without any endpoint flag (a caller of upsert_from_args) gives the same.
    assert deploy_infra.settings_from_args(argparse.Namespace(), GROUP, ROLE) == (environment, settings)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--endpoint-instance-count", "two", "'two' is not an integer"),
        ("--target-invocations-per-instance", "many", "'many' is not a number"),
        ("--traffic-routing", "sometimes", "invalid choice: 'SOMETIMES'"),
        ("--log-level", "loud", "invalid choice: 'LOUD'"),
    ],
)
def test_first_hop_a_flag_of_the_wrong_type_is_named_by_argparse(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["upsert"], ["deploy", "--model-package-arn", "arn"], ["iam", "deploy-policy"]):
        with pytest.raises(SystemExit) as exit_info:
            _subcommand().parse_args([*command, flag, value])
        assert exit_info.value.code == 2
        assert f"argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("INSTANCE_COUNT", "two", "INSTANCE_COUNT='two' is not an integer"),
        ("INSTANCE_COUNT", "0", "INSTANCE_COUNT='0' must be >= 1"),
        ("SERVERLESS_MEMORY_MB", "1500", "SERVERLESS_MEMORY_MB='1500' must be a multiple of 1024"),
        ("TARGET_INVOCATIONS_PER_INSTANCE", "-3", "TARGET_INVOCATIONS_PER_INSTANCE='-3' must be > 0"),
        ("TRAFFIC_ROUTING", "sometimes", "TRAFFIC_ROUTING='sometimes' must be one of ALL_AT_ONCE, CANARY, LINEAR"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL='loud' must be one of DEBUG, INFO, WARNING, ERROR"),
        ("INSTANCE_TYPE", "m5.large", "INSTANCE_TYPE='m5.large' is not a SageMaker instance type"),
        ("RESOURCE_NAME_PREFIX", "a-much-too-long-prefix", "RESOURCE_NAME_PREFIX='a-much-too-long-prefix' is not"),
        ("EXECUTION_ROLE_ARN", "", "EXECUTION_ROLE_ARN is not set"),
        ("MIN_CAPACITY", "3", "MIN_CAPACITY and MAX_CAPACITY turn on autoscaling together"),
    ],
)
def test_second_hop_the_function_names_a_bad_variable(variable: str, value: str, message: str) -> None:
    environment = deploy.DeploySettings(model_package_group=GROUP, execution_role_arn=ROLE).to_env()
    environment[variable] = value
    with pytest.raises(deploy.ConfigurationError) as caught:
        deploy.DeploySettings.from_env(environment)
    assert message in str(caught.value)
    assert variable in {setting.env for setting in caught.value.settings}


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--serverless-memory-mb", "1500"], ["--serverless-memory-mb='1500'", "SERVERLESS_MEMORY_MB"]),
        (["--endpoint-instance-count", "0"], ["--endpoint-instance-count='0' must be >= 1", "INSTANCE_COUNT"]),
        (["--endpoint-name", "bad_name!"], ["--endpoint-name='bad_name!' is not a valid endpoint name"]),
        (["--traffic-routing", "LINEAR"], ["--traffic-routing=LINEAR needs --traffic-step-percent"]),
        (["--min-capacity", "4", "--max-capacity", "2"], ["--min-capacity=4 is greater than --max-capacity=2"]),
        (["--serverless-memory-mb", "2048", "--min-capacity", "1", "--max-capacity", "2"], ["serverless endpoint"]),
    ],
)
def test_the_command_names_a_bad_setting_by_its_flag_and_its_variable(argv: list[str], names: list[str]) -> None:
    with pytest.raises(CommandError) as caught:
        deploy_infra.settings_from_args(_upsert(*argv), GROUP, ROLE)
    message = str(caught.value)
    for name in names:
        assert name in message
    assert "the deploy function reads them as" in message
    with pytest.raises(CommandError, match=r"--role='not-a-role' is not an IAM role ARN"):
        deploy_infra.settings_from_args(_upsert(), GROUP, "not-a-role")


def test_every_table_flag_is_on_each_command_that_sets_the_endpoint() -> None:
    own_flags = {setting.flag_name for setting in deploy.SETTINGS if setting.has_own_flag}
    for path in (["upsert"], ["deploy"], ["iam", "deploy-policy"]):
        parser = _subcommand(*path)
        flags = {option for action in parser._actions for option in action.option_strings}
        assert own_flags <= flags, path
        # Each fills the setting of its name.
        dests = {action.option_strings[0]: action.dest for action in parser._actions if action.option_strings}
        assert all(dests[flag] == flag[2:].replace("-", "_") for flag in own_flags)
    # The settings the command fills from its own flags use those flags on every command.
    for path in (["upsert"], ["deploy"], ["iam", "deploy-policy"]):
        flags = {option for action in _subcommand(*path)._actions for option in action.option_strings}
        assert {"--model-package-group", "--role"} <= flags


# --- the documentation ----------------------------------------------------------------------------------------


def test_deployment_doc_table_is_the_one_the_settings_make() -> None:
    text = DEPLOYMENT_DOC.read_text(encoding="utf-8")
    assert text.count(TABLE_START) == 1 and text.count(TABLE_END) == 1
    documented = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip("\n") + "\n"
    expected = deploy_infra.settings_table_markdown()
    assert documented == expected, (
        f"the settings table of {DEPLOYMENT_DOC} is out of date; put this between the markers:\n{expected}"
    )
    for setting in deploy.SETTINGS:
        assert f"`{setting.env}`" in documented


def test_the_help_of_each_flag_gives_its_variable_bounds_and_default() -> None:
    text = _subcommand("upsert").format_help()
    for setting in deploy.SETTINGS:
        if setting.has_own_flag:
            assert setting.flag_name in text and setting.env in text
    assert "integer 1024-6144, a multiple of 1024" in " ".join(text.split())


# --- one command line -----------------------------------------------------------------------------------------


def test_a_command_error_under_python_dash_m_is_one_line_and_status_2(tmp_path: Path) -> None:
    """run.py runs as __main__ and catches the CommandError that the command modules raise (no second copy of
    the class to miss)."""
    environment = {key: value for key, value in os.environ.items() if key != config.ENV_BUCKET}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "iam", "pipeline-policy", "--region", "eu-west-1"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: pass --bucket or set {config.ENV_BUCKET}\n"


@pytest.mark.parametrize(
    ("path", "old", "new", "dest", "value"),
    [
        (["upsert"], ["--spot"], ["--use-spot-instances"], "use_spot_instances", True),
        (["upsert"], ["--security-groups", "sg-1"], ["--security-group-ids", "sg-1"], "security_group_ids", ("sg-1",)),
        (["upsert"], ["--no-deploy-trigger"], ["--skip-deploy-wiring"], "skip_deploy_wiring", True),
        (["models"], ["--group", "G"], ["--model-package-group", "G"], "model_package_group", "G"),
        (["local"], ["--group", "G"], ["--model-package-group", "G"], "group", "G"),
        (["local-models"], ["--group", "G"], ["--model-package-group", "G"], "group", "G"),
        (["endpoint", "status"], ["--group", "G"], ["--model-package-group", "G"], "group", "G"),
        (
            ["deploy", "--model-package-arn", "a"],
            ["--wait-timeout-seconds", "9"],
            ["--timeout-seconds", "9"],
            "timeout_seconds",
            9,
        ),
    ],
)
def test_one_flag_name_per_concept_and_older_names_still_work_out_of_help(
    path: list[str], old: list[str], new: list[str], dest: str, value: Any
) -> None:
    parser = _subcommand()
    assert getattr(parser.parse_args([*path, *old]), dest) == value
    assert getattr(parser.parse_args([*path, *new]), dest) == value
    help_text = _subcommand(path[0]).format_help()
    assert new[0] in help_text and f"{old[0]} " not in help_text and not help_text.rstrip().endswith(old[0])


def test_deploy_policy_checks_its_endpoint_flags_as_upsert_does(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.run import main

    monkeypatch.delenv(config.ENV_ROLE_ARN, raising=False)
    account = ["--region", "eu-west-1", "--account-id", "123456789012"]
    assert main(["iam", "deploy-policy", "--role", ROLE, *account, "--min-capacity", "1"]) == 2
    assert "--min-capacity and --max-capacity turn on autoscaling together" in capsys.readouterr().err
    assert main(["iam", "deploy-policy", *account]) == 2
    assert f"pass --role or set {config.ENV_ROLE_ARN}" in capsys.readouterr().err


def test_deploy_policy_output_is_the_rendered_policy_for_the_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.run import main

    output = tmp_path / "policies" / "deploy-policy.json"
    output.parent.mkdir()
    argv = ["iam", "deploy-policy", "--role", ROLE, "--region", "eu-west-1", "--account-id", "123456789012"]
    assert main([*argv, "--endpoint-name", "Image-Classifier", "--output", str(output)]) == 0
    assert f"wrote {output}" in capsys.readouterr().err
    assert sorted(path.name for path in output.parent.iterdir()) == ["deploy-policy.json"]  # nothing half-written
    expected = deploy_infra.render_deploy_policy(
        region="eu-west-1",
        account_id="123456789012",
        execution_role_arn=ROLE,
        model_package_group=GROUP,
        endpoint_name="Image-Classifier",
    )
    assert json.loads(output.read_text(encoding="utf-8")) == expected
