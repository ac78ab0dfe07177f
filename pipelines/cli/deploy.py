"""``python -m pipelines.run deploy``: run the deploy Lambda's logic by hand for one model package.

Same code (``steps/deploy.py``), same settings (the flags become the same environment the function gets from
``upsert``), same result: the endpoint is created, or updated blue/green to the package's model. Useful to
deploy without waiting for EventBridge, to redeploy after fixing a failed endpoint, or to roll back by
deploying an older approved version. With ``--smoke-test-dir`` it waits for the update, runs ``endpoint-test``
against the endpoint, and when that fails serves the previous approved version again (the tested one becomes
Rejected) and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from pipelines import config
from pipelines.aws import deploy_infra
from pipelines.cli import backend
from pipelines.cli.sagemaker import add_hidden_alias, add_model_package_group_argument
from pipelines.util.errors import CommandError

IN_SERVICE_POLL_SECONDS = 30


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help="deploy an approved model package to the endpoint now (what the deploy Lambda does on approval)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-package-arn", required=True, help="ARN of the Approved model package to deploy")
    add_model_package_group_argument(parser, "the package must belong to this group (default: %(default)s)")
    parser.add_argument(
        "--role",
        default=None,
        help=f"SageMaker execution role the model runs under (default: ${config.ENV_ROLE_ARN})",
    )
    parser.add_argument("--region", default=None, help="AWS region (default: the AWS configuration's)")
    parser.add_argument(
        "--wait",
        action="store_true",
        default=False,
        help="after starting the deployment, wait until the endpoint is InService (default: return at once)",
    )
    parser.add_argument(
        "--timeout-seconds",
        type=int,
        default=3600,
        help="with --wait: stop waiting for InService after this long; the deployment goes on (default: %(default)s)",
    )
    add_hidden_alias(parser, "--wait-timeout-seconds", "timeout_seconds", type=int)
    parser.add_argument(
        "--smoke-test-dir",
        default=None,
        help="after the update, run endpoint-test with this test split (folder or s3:// prefix; implies --wait) "
        "and roll back to the previous approved version if it fails",
    )
    parser.add_argument("--smoke-test-images", type=int, default=20, help="images endpoint-test sends (default: 20)")
    deploy_infra.add_endpoint_arguments(parser)
    backend.add_backend_arguments(parser, "a local endpoint and the local registry's")
    backend.add_local_endpoint_arguments(parser.add_argument_group("with --local"), name_flag=None)
    parser.set_defaults(func=run_deploy)


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _local_clients(args: argparse.Namespace) -> tuple[Any, Any]:
    """The deploy function's settings and clients for a local endpoint: the workdir's LocalSageMaker, the local
    endpoint's name, and the stand-in role when no --role is given."""
    from pipelines.local import sagemaker as local_sagemaker
    from steps import deploy

    if args.smoke_test_dir:
        raise CommandError(
            "--smoke-test-dir works on SageMaker endpoints; test a local one with `endpoint-test --local --rollback`"
        )
    args.endpoint_name = args.endpoint_name or config.LOCAL_ENDPOINT_NAME
    role = getattr(args, "role", None) or local_sagemaker.ROLE_ARN
    _, settings = deploy_infra.settings_from_args(args, args.model_package_group, role)
    return settings, deploy.DeployClients(sagemaker=backend.local_client(args))


def _aws_clients(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    import boto3

    from steps import deploy

    execution_role_arn = deploy_infra.execution_role_from_args(args)
    _, settings = deploy_infra.settings_from_args(args, args.model_package_group, execution_role_arn)
    session = boto3.session.Session(region_name=args.region)
    if session.region_name is None:
        raise CommandError("no AWS region: pass --region or set AWS_REGION")
    return session, settings, deploy.create_clients(session=session)


def run_deploy(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    from steps import deploy

    _configure_logging()
    if args.local:
        session, (settings, clients) = None, _local_clients(args)
    else:
        session, settings, clients = _aws_clients(args)
    deploy.logger.setLevel(settings.log_level)
    try:
        result = deploy.deploy_model_package(args.model_package_arn, settings, clients)
    except deploy.DeployError as error:
        raise CommandError(str(error)) from error
    except ClientError as error:
        details = error.response.get("Error", {})
        raise CommandError(
            f"{'' if not args.local else 'local '}{error.operation_name} failed for {args.model_package_arn}: "
            f"{details.get('Code', '?')}: {details.get('Message', error)}"
        ) from error
    except BotoCoreError as error:
        raise CommandError(f"AWS is out of reach ({error}); check your credentials and region") from error
    if result["action"] == "ignored":
        raise CommandError(
            f"not deployed: {result['reason']}. Deploy an Approved package of {args.model_package_group} "
            "(approve it in Studio or with `python -m pipelines.run approve`), or pass --model-package-group."
        )
    if args.wait or args.smoke_test_dir:
        result["endpoint_status"] = _wait_in_service(
            clients.sagemaker, result["endpoint_name"], result["endpoint_config_name"], args
        )
    print(json.dumps(result, indent=2, default=str))
    if args.smoke_test_dir:
        _smoke_test_or_roll_back(args, session, settings, clients, result["endpoint_name"])
    return 0


def _smoke_test_or_roll_back(args: argparse.Namespace, session: Any, settings: Any, clients: Any, name: str) -> None:
    """endpoint-test on the updated endpoint; on failure, the previous approved version is served again."""
    from pipelines.cli import endpoint_test
    from steps import deploy

    test_args = argparse.Namespace(
        test_dir=args.smoke_test_dir,
        images=args.smoke_test_images,
        endpoint=None,
        endpoint_name=name,
        model=None,
        region=session.region_name,
        workdir=None,
        name=None,
        rollback=False,
        json=False,
    )
    if endpoint_test.run_endpoint_test(test_args) == 0:
        return
    from botocore.exceptions import BotoCoreError, ClientError

    reason = f"endpoint-test failed on {name} after deploying {args.model_package_arn}"
    try:
        rolled = roll_back(
            args.model_package_arn,
            reason,
            settings,
            clients,
            wait=lambda config_name: _wait_in_service(clients.sagemaker, name, config_name, args),
        )
    except (deploy.DeployError, CommandError, ClientError, BotoCoreError) as error:
        raise CommandError(f"{reason}; {error}") from error
    raise CommandError(
        f"{reason}: rolled back to {rolled['model_package_arn']} (now InService); the tested version is Rejected"
    )


def _wait_in_service(sagemaker_client: Any, endpoint_name: str, config_name: str, args: argparse.Namespace) -> str:
    """Wait for the deployment to finish; an endpoint back InService on another config was rolled back."""
    deadline = time.monotonic() + args.timeout_seconds
    while True:
        endpoint = sagemaker_client.describe_endpoint(EndpointName=endpoint_name)
        status = endpoint["EndpointStatus"]
        print(f"endpoint {endpoint_name}: {status}", file=sys.stderr, flush=True)
        if status == "InService" and not endpoint.get("PendingDeploymentSummary"):
            if endpoint.get("EndpointConfigName") != config_name:
                raise CommandError(
                    f"endpoint {endpoint_name} is InService on {endpoint.get('EndpointConfigName')}, not "
                    f"{config_name}: the update was rolled back ({endpoint.get('FailureReason', 'see its events')})"
                )
            return status
        if status in ("Failed", "UpdateRollbackFailed"):
            raise CommandError(f"endpoint {endpoint_name} is {status}: {endpoint.get('FailureReason', 'no reason')}")
        if time.monotonic() > deadline:
            raise CommandError(
                f"endpoint {endpoint_name} still {status} after {args.timeout_seconds}s; "
                "the deployment goes on: check it with `aws sagemaker describe-endpoint`"
            )
        time.sleep(IN_SERVICE_POLL_SECONDS)


# --- rolling back ---------------------------------------------------------------------------------------------
#
# Here, not in steps/deploy.py: the deploy Lambda never rolls back, and its least-privilege role must not be able
# to change a package's approval status (UpdateModelPackage). The person running `deploy` may.


def roll_back(
    failed_package_arn: str,
    reason: str,
    settings: Any,
    clients: Any,
    wait: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Serve the previous Approved version again, then mark ``failed_package_arn`` Rejected with ``reason``.

    In that order, and after ``wait`` (given the new endpoint config's name) returns, so that a deploy that fails
    leaves the failed version Approved and the registry agreeing with what the endpoint serves. Raises DeployError
    when there is no earlier approved version or its deploy did not go ahead; a failure to mark it afterwards
    raises DeployError saying the endpoint was rolled back and what is left to do.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from steps import deploy

    package = clients.sagemaker.describe_model_package(ModelPackageName=failed_package_arn)
    group, version = package["ModelPackageGroupName"], package["ModelPackageVersion"]
    previous = backend.previous_approved_package(clients.sagemaker, group, version)
    if previous is None:
        raise deploy.DeployError(
            f"cannot roll back: {group} has no Approved version before {version}; the endpoint keeps serving it. "
            "Fix it, or reject it and deploy another version by hand."
        )
    print(f"rolling back to {previous['ModelPackageArn']}: {reason}", file=sys.stderr, flush=True)
    try:
        result = deploy.deploy_model_package(previous["ModelPackageArn"], settings, clients)
        if result.get("action") == "ignored":
            raise deploy.DeployError(result.get("reason", "the deploy was ignored"))
        if wait is not None:
            wait(result["endpoint_config_name"])
    except (deploy.DeployError, ClientError, BotoCoreError, CommandError) as error:
        raise deploy.DeployError(
            f"no rollback: {previous['ModelPackageArn']} could not be served ({error}); version {version} stays "
            "Approved"
        ) from error
    try:
        clients.sagemaker.update_model_package(
            ModelPackageArn=failed_package_arn, ModelApprovalStatus="Rejected", ApprovalDescription=reason[:1024]
        )
    except (ClientError, BotoCoreError) as error:
        raise deploy.DeployError(
            f"rolled back half way: the endpoint serves {previous['ModelPackageArn']} again, but {failed_package_arn} "
            f"could not be marked Rejected ({error}); mark it with `python -m pipelines.run reject`"
        ) from error
    return {**result, "rolled_back_from": failed_package_arn, "reason": reason}
