"""The run -> version link on SageMaker: the deploy function tags the MLflow run a model package names (its
CustomerMetadataProperties), and its parent, with the package's ARN, version and approval status, over MLflow's
REST API (no mlflow in the function); the IAM statements that allow it appear only with a tracking ARN."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from _mlflow import MlflowServer, free_port
from moto import mock_aws

from entrypoints import tracking
from pipelines.run import main
from steps import deploy

REGION = "us-east-1"
ACCOUNT = "123456789012"
GROUP = "TrackedModels"
EXECUTION_ROLE = f"arn:aws:iam::{ACCOUNT}:role/sagemaker-execution"
SERVER_ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:mlflow-tracking-server/team-server"
APP_ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:mlflow-app/app-abc123"
PACKAGE_ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{GROUP.lower()}/3"
RUN, PARENT = "a" * 32, "b" * 32
STATUS_TAGS = ("model_package.arn", "model_package.version", "model_package.status")


def test_the_functions_metadata_keys_are_the_trackers() -> None:
    """deploy.py is zipped alone, so it holds its own copy of the keys the Register step writes."""
    assert deploy.MLFLOW_RUN_ID_KEY == tracking.PACKAGE_RUN_ID
    assert deploy.MLFLOW_TRACKING_URI_KEY == tracking.PACKAGE_TRACKING_URI
    assert deploy.MLFLOW_NOT_TRACKED == tracking.NOT_TRACKED
    assert deploy.MLFLOW_PARENT_TAG == tracking.TAG_PARENT


# --- against a real MLflow server -----------------------------------------------------------------------------


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
        boto3.setup_default_session(region_name=REGION)
        client = boto3.client("sagemaker")
        client.create_model_package_group(ModelPackageGroupName=GROUP)
        yield client


@pytest.fixture
def function_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "ENDPOINT_NAME",
        "SERVERLESS_MEMORY_MB",
        "MIN_CAPACITY",
        "MAX_CAPACITY",
        deploy.MLFLOW_ENDPOINT_VARIABLE,
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODEL_PACKAGE_GROUP_NAME", GROUP)
    monkeypatch.setenv("EXECUTION_ROLE_ARN", EXECUTION_ROLE)
    monkeypatch.setenv("ENDPOINT_WAIT_SECONDS", "0")


def register(client: Any, run_id: str, uri: str) -> str:
    """A package as the Register step makes it with tracking: its metadata names the run and the server."""
    return client.create_model_package(
        ModelPackageGroupName=GROUP,
        InferenceSpecification={
            "Containers": [{"Image": "pytorch-inference:2.6", "ModelDataUrl": "s3://bucket/model.tar.gz"}],
            "SupportedContentTypes": ["image/jpeg"],
            "SupportedResponseMIMETypes": ["application/json"],
        },
        ModelApprovalStatus="PendingManualApproval",
        CustomerMetadataProperties={
            tracking.PACKAGE_RUN_ID: run_id,
            tracking.PACKAGE_EXPERIMENT: "ImageClassificationPipeline",
            tracking.PACKAGE_TRACKING_URI: uri,
        },
    )["ModelPackageArn"]


def status_change(client: Any, arn: str, status: str) -> dict[str, Any]:
    """Set the package's status and return the EventBridge event that the change sends."""
    # moto's UpdateModelPackage drops the metadata it is not given again; SageMaker keeps it
    metadata = client.describe_model_package(ModelPackageName=arn).get("CustomerMetadataProperties")
    client.update_model_package(ModelPackageArn=arn, ModelApprovalStatus=status, CustomerMetadataProperties=metadata)
    return {
        "source": deploy.EVENT_SOURCE,
        "detail-type": deploy.EVENT_DETAIL_TYPE,
        "resources": [arn],
        "detail": {"ModelPackageGroupName": GROUP, "ModelApprovalStatus": status, "ModelPackageArn": arn},
    }


@pytest.mark.slow
def test_the_function_tags_the_run_and_its_parent_on_a_real_server(aws, function_env, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "server").start()
    try:
        client = MlflowClient(tracking_uri=server.url)
        experiment = client.create_experiment("ImageClassificationPipeline")
        parent = client.create_run(experiment, tags={tracking.TAG_ROLE: tracking.ROLE_PARENT}).info.run_id
        run = client.create_run(experiment, tags={tracking.TAG_PARENT: parent}).info.run_id
        arn = register(aws, run, server.url)

        def tags(run_id: str) -> dict[str, str]:
            return {key: value for key, value in client.get_run(run_id).data.tags.items() if key in STATUS_TAGS}

        # the pipeline's Deploy step: the status as registered
        assert deploy.handler({"model_package_arn": arn}, None)["action"] == deploy.AWAITING_APPROVAL
        expected = {"model_package.arn": arn, "model_package.version": "1"}
        assert tags(run) == tags(parent) == {**expected, "model_package.status": "PendingManualApproval"}
        # an approval event: the new status (and the deployment goes ahead)
        assert deploy.handler(status_change(aws, arn, "Approved"), None)["action"] == "created"
        assert tags(run) == tags(parent) == {**expected, "model_package.status": "Approved"}
        # a rejection event (a tracked pipeline's rule sends them): nothing to deploy, the run learns it
        assert deploy.handler(status_change(aws, arn, "Rejected"), None)["action"] == "ignored"
        assert tags(run) == tags(parent) == {**expected, "model_package.status": "Rejected"}
    finally:
        server.stop()


# --- the signed path, against a fake server -------------------------------------------------------------------


class FakeMlflow:
    """An HTTP server in a thread that records every request and answers as MLflow's REST API does."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        recorded = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: dict[str, Any]) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length) if length else b""
                recorded.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": payload}
                )
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                tag = {"key": tracking.TAG_PARENT, "value": PARENT}
                self._answer({"run": {"info": {"run_id": RUN}, "data": {"tags": [tag]}}})

            def do_POST(self) -> None:
                self._answer({})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeMlflow:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The function's role, as Lambda hands it over: in the environment."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFUNCTIONROLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")


def stubbed_sagemaker(package: dict[str, Any]) -> tuple[Any, Any]:
    import botocore.session
    from botocore.stub import Stubber

    client = botocore.session.get_session().create_client(
        "sagemaker", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="y"
    )
    stubber = Stubber(client)
    stubber.add_response("describe_model_package", package, {"ModelPackageName": package["ModelPackageArn"]})
    stubber.activate()
    return client, stubber


def described(uri: str, status: str) -> dict[str, Any]:
    """DescribeModelPackage's answer for a tracked package (the fields the function reads, and the required ones)."""
    return {
        "ModelPackageName": GROUP,
        "ModelPackageGroupName": GROUP,
        "ModelPackageVersion": 3,
        "ModelPackageArn": PACKAGE_ARN,
        "CreationTime": "2026-01-01T00:00:00Z",
        "ModelPackageStatus": "Completed",
        "ModelPackageStatusDetails": {"ValidationStatuses": []},
        "ModelApprovalStatus": status,
        "CustomerMetadataProperties": {tracking.PACKAGE_RUN_ID: RUN, tracking.PACKAGE_TRACKING_URI: uri},
    }


def test_a_rejection_tags_the_run_on_a_sagemaker_tracking_server_signed_as_the_plugin_signs(
    credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = deploy.DeploySettings.from_env({"MODEL_PACKAGE_GROUP_NAME": GROUP, "EXECUTION_ROLE_ARN": EXECUTION_ROLE})
    event = {
        "source": deploy.EVENT_SOURCE,
        "detail-type": deploy.EVENT_DETAIL_TYPE,
        "detail": {"ModelPackageGroupName": GROUP, "ModelApprovalStatus": "Rejected", "ModelPackageArn": PACKAGE_ARN},
    }
    sagemaker, stubber = stubbed_sagemaker(described(SERVER_ARN, "Rejected"))
    with FakeMlflow() as fake:
        # the plugin's own override of the region's endpoint, honoured the same way
        monkeypatch.setenv(deploy.MLFLOW_ENDPOINT_VARIABLE, fake.url)
        result = deploy.invoke(event, settings, deploy.DeployClients(sagemaker=sagemaker))

    assert result["action"] == "ignored"  # nothing to deploy
    stubber.assert_no_pending_responses()  # the package was described for its metadata
    first, *writes = fake.requests
    assert (first["method"], first["path"]) == ("GET", f"/api/2.0/mlflow/runs/get?run_id={RUN}")
    tagged = [(request["path"], json.loads(request["body"])) for request in writes]
    expected = {"model_package.arn": PACKAGE_ARN, "model_package.version": "3", "model_package.status": "Rejected"}
    assert tagged == [
        ("/api/2.0/mlflow/runs/set-tag", {"run_id": run_id, "key": key, "value": value})
        for run_id in (RUN, PARENT)
        for key, value in expected.items()
    ]
    for request in fake.requests:
        headers = {key.lower(): value for key, value in request["headers"].items()}
        # SigV4 with the function's credentials for the signing name sagemaker-mlflow uses for a tracking server
        scope = re.fullmatch(
            r"AWS4-HMAC-SHA256 Credential=AKIDFUNCTIONROLE/\d{8}/(?P<region>[a-z0-9-]+)/(?P<service>[a-z-]+)/"
            r"aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=[0-9a-f]{64}",
            headers["authorization"],
        )
        assert scope is not None, headers["authorization"]
        assert (scope["region"], scope["service"]) == (REGION, "sagemaker-mlflow")
        # the routing header names the server, and it is signed along with the body's hash
        assert headers["x-mlflow-sm-tracking-server-arn"] == SERVER_ARN
        assert {"host", "x-amz-date", "x-amz-content-sha256", "x-mlflow-sm-tracking-server-arn"} <= set(
            scope["signed"].split(";")
        )
        assert headers["x-amz-content-sha256"] == hashlib.sha256(request["body"]).hexdigest()


@pytest.mark.parametrize(
    ("arn", "url", "header", "signing_name"),
    [
        (
            SERVER_ARN,
            f"https://{REGION}.experiments.sagemaker.aws",
            "x-mlflow-sm-tracking-server-arn",
            "sagemaker-mlflow",
        ),
        (APP_ARN, f"https://mlflow.sagemaker.{REGION}.app.aws", "x-sm-mlflow-app-arn", "sagemaker"),
    ],
)
def test_a_sagemaker_mlflow_arn_is_reached_as_the_plugin_reaches_it(arn, url, header, signing_name) -> None:
    server = deploy.mlflow_server(arn, environ={})
    assert server == deploy.MlflowServer(url, {header: arn}, signing_name, REGION)


def test_plain_urls_are_unsigned_and_other_uris_are_left_to_the_local_runner() -> None:
    assert deploy.mlflow_server("http://mlflow.internal:5000/", environ={}) == deploy.MlflowServer(
        "http://mlflow.internal:5000", {}
    )
    assert deploy.mlflow_server("sqlite:////tmp/mlflow.db", environ={}) is None
    with pytest.raises(ValueError, match="not a SageMaker MLflow"):
        deploy.mlflow_server(f"arn:aws-cn:sagemaker:cn-north-1:{ACCOUNT}:mlflow-tracking-server/x", environ={})


# --- failures: one line, and the deployment's answer stands ---------------------------------------------------


def not_tagged_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if "mlflow run not tagged" in record.getMessage()]


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param(f"http://127.0.0.1:{free_port()}", id="nothing-listening"),
        pytest.param(f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:mlflow-tracking-server/*", id="not-a-server-arn"),
    ],
)
def test_a_tagging_failure_is_one_line_and_the_deploy_step_answers_as_without(
    aws, function_env, caplog: pytest.LogCaptureFixture, uri: str
) -> None:
    arn = register(aws, RUN, uri)
    with caplog.at_level(logging.INFO, logger="deploy"):
        result = deploy.handler({"model_package_arn": arn}, None)
    assert result["action"] == deploy.AWAITING_APPROVAL and result["model_package_arn"] == arn
    (line,) = not_tagged_lines(caplog)
    assert RUN in line and "error=" in line


def test_a_server_that_never_answers_costs_one_bounded_wait(
    aws, function_env, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deploy, "MLFLOW_TIMEOUT_SECONDS", 0.5)
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        arn = register(aws, RUN, f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="deploy"):
            approved = status_change(aws, arn, "Approved")
            result = deploy.handler(approved, None)
        elapsed = time.monotonic() - started
    assert result["action"] == "created"  # the approval deployed all the same
    assert len(not_tagged_lines(caplog)) == 1
    assert elapsed < 3.0  # one timed-out request, not seven


def test_packages_without_a_run_or_with_a_local_store_make_no_request(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="deploy"):
        assert deploy.tag_mlflow_run({"ModelPackageArn": PACKAGE_ARN}) is None
        not_tracked = {tracking.PACKAGE_RUN_ID: tracking.NOT_TRACKED, tracking.PACKAGE_TRACKING_URI: SERVER_ARN}
        assert deploy.tag_mlflow_run({"CustomerMetadataProperties": not_tracked}) is None
        local = {tracking.PACKAGE_RUN_ID: RUN, tracking.PACKAGE_TRACKING_URI: "sqlite:////tmp/mlflow.db"}
        assert deploy.tag_mlflow_run({"CustomerMetadataProperties": local}) is None
    assert caplog.records == []


# --- approve / reject on SageMaker ----------------------------------------------------------------------------


def test_approve_and_reject_on_sagemaker_tag_the_run_too(aws, monkeypatch: pytest.MonkeyPatch) -> None:
    arn = register(aws, RUN, SERVER_ARN)
    seen: list[tuple[str, str]] = []

    def record(package: dict[str, Any], tracking_uri: str | None = None) -> str:
        seen.append((package["ModelPackageArn"], package["ModelApprovalStatus"]))
        return RUN

    monkeypatch.setattr(tracking, "tag_registered_version", record)
    monkeypatch.setenv("AWS_REGION", REGION)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["approve", arn, "--model-package-group", GROUP, "--region", REGION]) == 0
        assert main(["reject", arn, "--model-package-group", GROUP, "--region", REGION]) == 0
    assert seen == [(arn, "Approved"), (arn, "Rejected")]


# --- IAM: the statements appear with a tracking ARN only, on that ARN alone -----------------------------------


def deploy_policy(**extra: Any) -> list[dict[str, Any]]:
    from pipelines.aws import deploy_infra

    return deploy_infra.render_deploy_policy(
        region=REGION, account_id=ACCOUNT, execution_role_arn=EXECUTION_ROLE, model_package_group=GROUP, **extra
    )["Statement"]


def mlflow_statements(statements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        s for s in statements if any(a.startswith(("sagemaker-mlflow:", "sagemaker:CallMlflow")) for a in s["Action"])
    ]


def test_the_deploy_functions_role_may_tag_runs_on_that_server_alone(tmp_path: Path) -> None:
    from pipelines.aws import deploy_infra

    assert mlflow_statements(deploy_policy()) == []
    tracked = deploy_policy(mlflow_tracking_arn=SERVER_ARN)
    assert mlflow_statements(tracked) == [
        {
            "Sid": deploy_infra.MLFLOW_SID,
            "Effect": "Allow",
            "Action": ["sagemaker-mlflow:GetRun", "sagemaker-mlflow:SetTag"],  # runs/get and runs/set-tag
            "Resource": [SERVER_ARN],
        }
    ]
    assert tracked[:-1] == deploy_policy()  # nothing else changes
    # an app's REST API is gated by SageMaker's own action too, on the app alone
    (app,) = mlflow_statements(deploy_policy(mlflow_tracking_arn=APP_ARN))
    assert app["Action"][-1] == "sagemaker:CallMlflowAppApi" and app["Resource"] == [APP_ARN]
    with pytest.raises(ValueError, match="not a SageMaker MLflow"):
        deploy_policy(mlflow_tracking_arn=f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:mlflow-tracking-server/*")
    # `iam deploy-policy` renders the same
    output = tmp_path / "policy.json"
    argv = ["iam", "deploy-policy", "--region", REGION, "--account-id", ACCOUNT, "--role", EXECUTION_ROLE]
    argv += ["--model-package-group", GROUP, "--output", str(output)]
    with contextlib.redirect_stderr(io.StringIO()):
        assert main([*argv, "--mlflow-tracking-arn", SERVER_ARN]) == 0
        assert json.loads(output.read_text())["Statement"] == tracked
        assert main(argv) == 0
        assert mlflow_statements(json.loads(output.read_text())["Statement"]) == []


def test_the_pipeline_role_on_an_mlflow_app_gets_the_apps_gate_too() -> None:
    from pipelines.aws import iam

    def statements(arn: str) -> list[dict[str, Any]]:
        policy = iam.render_pipeline_role_policy(
            region=REGION, account_id=ACCOUNT, bucket="b-1", mlflow_tracking_arn=arn, image_uris=[]
        )
        return mlflow_statements(policy["Statement"])

    assert statements(APP_ARN) == [
        {
            "Sid": iam.MLFLOW_SID,
            "Effect": "Allow",
            "Action": ["sagemaker-mlflow:*", "sagemaker:CallMlflowAppApi"],
            "Resource": [APP_ARN],
        }
    ]
    assert statements(SERVER_ARN)[0]["Action"] == ["sagemaker-mlflow:*"]


def stack_policies(template: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Resource name -> the statements of every policy document the resource holds."""
    policies: dict[str, list[dict[str, Any]]] = {}
    for name, resource in template["Resources"].items():
        properties = resource.get("Properties", {})
        documents = [properties.get("PolicyDocument")] + [p["PolicyDocument"] for p in properties.get("Policies", [])]
        policies[name] = [s for document in documents if document for s in document["Statement"]]
    return policies


def test_the_stacks_roles_get_the_mlflow_statements_only_when_upsert_arguments_name_the_arn(tmp_path: Path) -> None:
    from pipelines.aws import deploy_infra, iam, stack_template
    from pipelines.cli import bootstrap

    assert bootstrap.upsert_mlflow_tracking_arn("") is None
    assert bootstrap.upsert_mlflow_tracking_arn("--no-debugger --use-spot-instances") is None
    arn = bootstrap.upsert_mlflow_tracking_arn(f"--no-debugger --mlflow-tracking-arn {SERVER_ARN}")
    assert arn == SERVER_ARN
    assert bootstrap.upsert_mlflow_tracking_arn(f"--mlflow-tracking-arn={SERVER_ARN}") == SERVER_ARN

    plain, tracked = (
        stack_policies(stack_template.render_template()),
        stack_policies(stack_template.render_template(mlflow_tracking_arn=arn)),
    )
    added = {name: tracked[name][len(plain[name]) :] for name in tracked if tracked[name] != plain[name]}
    assert all(tracked[name][: len(plain[name])] == plain[name] for name in tracked)  # only appended
    assert sorted(added) == ["DeployFunctionRole", "PipelineExecutionPolicy"]
    assert added["PipelineExecutionPolicy"] == [iam.mlflow_statement(SERVER_ARN)]
    assert added["DeployFunctionRole"] == [
        iam.mlflow_statement(SERVER_ARN, deploy_infra.MLFLOW_TAG_ACTIONS, deploy_infra.MLFLOW_SID)
    ]
    assert mlflow_statements([s for statements in plain.values() for s in statements]) == []

    # `bootstrap --print-template` writes the same for the same --upsert-arguments
    output = tmp_path / "stack.yml"
    flags = ["--upsert-arguments", f"--mlflow-tracking-arn {SERVER_ARN}"]
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["bootstrap", "--print-template", str(output), *flags]) == 0
    assert output.read_text() == stack_template.template_text(stack_template.render_template(mlflow_tracking_arn=arn))


def test_a_tracked_pipelines_rule_sends_rejections_to_the_function_too(aws) -> None:
    from pipelines.aws import deploy_infra

    events = boto3.client("events")

    def statuses(tracking: bool) -> list[str]:
        rule = deploy_infra.upsert_rule(events, rule_name="rule", model_package_group=GROUP, tracking=tracking)
        assert rule["event_pattern"] == json.loads(events.describe_rule(Name="rule")["EventPattern"])
        return rule["event_pattern"]["detail"]["ModelApprovalStatus"]

    assert statuses(tracking=False) == ["Approved"]
    assert statuses(tracking=True) == ["Approved", "Rejected"]
    assert statuses(tracking=False) == ["Approved"]  # dropping the option narrows the rule again
