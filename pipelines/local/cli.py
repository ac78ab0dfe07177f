"""Commands of the local pipeline: ``local``, ``predict``, ``endpoint``, ``local-models``.

    python -m pipelines.run local [--data PATH] [--workdir runs] [--trials N] [--approve] ...
    python -m pipelines.run predict IMAGE [IMAGE ...] [--endpoint URL | --endpoint-name NAME]
    python -m pipelines.run endpoint status|start|stop [--workdir runs]
    python -m pipelines.run local-models [--approve VERSION | --reject VERSION]

Nothing here imports torch, boto3 or the SageMaker SDK at start: ``local`` begins at once and the steps'
scripts import what they need in their own processes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipelines import config
from pipelines.run import CommandError

EXIT_PIPELINE_FAILED = 1


def _hyperparameter(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (for example architecture=resnet34), got {text!r}")
    return key.strip().lstrip("-"), value.strip()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    workdir_help = "folder of runs, step cache, local model registry and endpoints"

    local = subparsers.add_parser(
        "local",
        help="run the whole pipeline on this machine (no AWS, no Docker)",
        description="Run Preprocess -> Tune -> Train -> Evaluate -> CheckAccuracy -> Register on this machine, each "
        "step under the SageMaker container contract, with step caching, a local model registry and (with "
        "--approve) a local endpoint. Without --data it runs on the built-in demo (scikit-learn's digits).",
    )
    local.add_argument("--data", type=Path, default=None, help="archive or folder of images (default: built-in demo)")
    local.add_argument("--workdir", type=Path, default=Path(config.LOCAL_WORKDIR), help=workdir_help)
    local.add_argument(
        "--preset",
        choices=("demo", "pipeline"),
        default=None,
        help="settings: 'demo' (config.LOCAL_DEMO_*: small CNN from scratch, small images; default without --data) "
        "or 'pipeline' (the SageMaker pipeline's defaults; default with --data)",
    )
    local.add_argument(
        "--trials", type=_positive_int, default=None, help="tuning trials (default: LOCAL_TUNING_TRIALS)"
    )
    local.add_argument(
        "--parallel", type=_positive_int, default=None, help="trials at a time (default: up to the CPUs)"
    )
    local.add_argument("--tuning-epochs", type=_positive_int, default=None, help="epochs of each trial")
    local.add_argument("--epochs", type=_positive_int, default=None, help="epochs of the final training")
    local.add_argument("--image-size", type=_positive_int, default=None, help="short side the processing step keeps")
    local.add_argument(
        "--hp",
        type=_hyperparameter,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fix a hyperparameter (repeatable; a tuned one leaves the search), e.g. --hp architecture=resnet34",
    )
    local.add_argument("--threshold", type=float, default=None, help="accuracy the model must reach to be registered")
    local.add_argument("--seed", type=int, default=config.LOCAL_TUNING_SEED, help="seed of the tuner's sampling")
    local.add_argument("--no-cache", dest="cache", action="store_false", help="run every step, reuse nothing")
    local.add_argument(
        "--approve",
        action="store_true",
        help="approve the registered version and serve it on a local endpoint (stop it with 'endpoint stop')",
    )
    local.add_argument("--endpoint-name", default=config.LOCAL_ENDPOINT_NAME, help="name of the local endpoint")
    local.add_argument("--port", type=int, default=config.LOCAL_ENDPOINT_PORT, help="port of the local endpoint")
    local.add_argument(
        "--ray",
        action="store_true",
        help="serve on a local Ray Serve cluster as AWS's Ray Serve container does (slower start; needs ray[serve])",
    )
    local.add_argument("--group", default=config.MODEL_PACKAGE_GROUP, help="model package group in the local registry")
    local.add_argument("--quiet", action="store_true", help="print only the summary")
    local.set_defaults(func=run_local)

    predict = subparsers.add_parser(
        "predict",
        help="send images to an endpoint and print the top classes",
        description="Send images to a local endpoint (--endpoint URL, default: the local endpoint recorded in "
        "--workdir) or a SageMaker endpoint (--endpoint-name, needs AWS credentials) and print the top-k classes.",
    )
    predict.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    target = predict.add_mutually_exclusive_group()
    target.add_argument("--endpoint", default=None, help="URL of an endpoint, e.g. http://127.0.0.1:8080")
    target.add_argument("--endpoint-name", default=None, help="name of a SageMaker endpoint (sagemaker-runtime)")
    predict.add_argument("--region", default=None, help="AWS region of --endpoint-name (default: AWS_REGION)")
    predict.add_argument(
        "--top-k", type=_positive_int, default=None, help="classes per image (default: the endpoint's)"
    )
    predict.add_argument("--workdir", type=Path, default=Path(config.LOCAL_WORKDIR), help=workdir_help)
    predict.add_argument("--json", action="store_true", help="print the endpoint's JSON answer as is")
    predict.set_defaults(func=run_predict)

    endpoint = subparsers.add_parser(
        "endpoint",
        help="start, stop or show the local endpoint",
        description="The local endpoint is a background server process recorded in <workdir>/endpoints/.",
    )
    endpoint.add_argument("action", choices=("status", "start", "stop"), help="what to do")
    endpoint.add_argument("--workdir", type=Path, default=Path(config.LOCAL_WORKDIR), help=workdir_help)
    endpoint.add_argument("--name", default=config.LOCAL_ENDPOINT_NAME, help="endpoint name")
    endpoint.add_argument("--group", default=config.MODEL_PACKAGE_GROUP, help="model package group (start)")
    endpoint.add_argument(
        "--version", type=_positive_int, default=None, help="version to serve (start; default: the newest approved)"
    )
    endpoint.add_argument("--port", type=int, default=config.LOCAL_ENDPOINT_PORT, help="port (start)")
    endpoint.add_argument(
        "--ray",
        action="store_true",
        help="serve on a local Ray Serve cluster as AWS's Ray Serve container does (slower start; needs ray[serve])",
    )
    endpoint.set_defaults(func=run_endpoint)

    models = subparsers.add_parser(
        "local-models",
        help="list, approve or reject versions in the local model registry",
        description="The local model registry (<workdir>/model-registry.json). Approving a version deploys it to "
        "the local endpoint, as the deploy Lambda does on SageMaker.",
    )
    models.add_argument("--workdir", type=Path, default=Path(config.LOCAL_WORKDIR), help=workdir_help)
    models.add_argument("--group", default=config.MODEL_PACKAGE_GROUP, help="model package group")
    decision = models.add_mutually_exclusive_group()
    decision.add_argument("--approve", type=_positive_int, metavar="VERSION", default=None, help="approve and deploy")
    decision.add_argument("--reject", type=_positive_int, metavar="VERSION", default=None, help="reject a version")
    models.add_argument("--no-deploy", action="store_true", help="approve without deploying")
    models.add_argument("--endpoint-name", default=config.LOCAL_ENDPOINT_NAME, help="endpoint to deploy to")
    models.add_argument("--port", type=int, default=config.LOCAL_ENDPOINT_PORT, help="port of the local endpoint")
    models.add_argument(
        "--ray",
        action="store_true",
        help="serve on a local Ray Serve cluster as AWS's Ray Serve container does (slower start; needs ray[serve])",
    )
    models.set_defaults(func=run_models)


# --- local --------------------------------------------------------------------------------------------------------


def run_local(args: argparse.Namespace) -> int:
    from pipelines.local.console import Console
    from pipelines.local.runner import LocalPipeline, LocalRunOptions, PipelineFailed

    if args.data is not None and not args.data.exists():
        raise CommandError(f"--data {args.data} does not exist: pass an archive (.zip, .tar.gz) or a folder of images")
    if args.workdir.exists() and not args.workdir.is_dir():
        raise CommandError(f"--workdir {args.workdir} is a file: pass a folder")
    options = LocalRunOptions(
        workdir=args.workdir,
        data=args.data,
        preset=args.preset,
        trials=args.trials,
        parallel=args.parallel,
        tuning_epochs=args.tuning_epochs,
        training_epochs=args.epochs,
        image_size=args.image_size,
        threshold=args.threshold,
        hyperparameters=dict(args.hp),
        seed=args.seed,
        cache=args.cache,
        approve=args.approve,
        endpoint_name=args.endpoint_name,
        port=args.port,
        ray=args.ray,
        model_package_group=args.group,
    )
    console = Console(quiet=args.quiet)
    try:
        pipeline = LocalPipeline(options, console)
    except ValueError as error:
        raise CommandError(str(error)) from error
    started = time.perf_counter()
    try:
        record = pipeline.run()
    except PipelineFailed as failure:
        print(
            f"error: {failure}; the run folder {pipeline.run_dir} is kept for inspection "
            f"({time.perf_counter() - started:.1f} s)",
            file=sys.stderr,
        )
        return EXIT_PIPELINE_FAILED
    print_summary(record, args.workdir, quiet_console=args.quiet)
    return 0


def print_summary(record: dict[str, Any], workdir: Path, quiet_console: bool = False) -> None:
    summary = record["Summary"]
    tuned = summary.get("tuned_hyperparameters", {})
    best = " ".join(f"{key}={_decoded(value)}" for key, value in sorted(tuned.items()))
    package = summary.get("model_package", {})
    rows = [
        ("run", f"{record['RunId']} ({record['ElapsedSeconds']:.1f} s): {record['RunFolder']}"),
        ("best hyperparameters", f"{best} ({summary.get('best_trial', '?')})"),
        ("test accuracy", f"{summary.get('test_accuracy', float('nan')):.4f}"),
        ("confusion matrix", summary.get("confusion_matrix") or "(not written)"),
        (
            "registry",
            f"{package.get('ModelPackageArn', '?')} version {package.get('ModelPackageVersion', '?')} "
            f"{package.get('ModelApprovalStatus', '')}",
        ),
    ]
    if "endpoint" in summary:
        url = summary["endpoint"]["url"]
        rows.append(("endpoint", f"{url} (try: python -m pipelines.run predict IMAGE --endpoint {url})"))
        rows.append(("stop it with", f"python -m pipelines.run endpoint stop --workdir {workdir}"))
    else:
        rows.append(("endpoint", "none: pass --approve, or run 'python -m pipelines.run local-models --approve N'"))
    lines = ["", "Summary"]
    width = max(len(key) for key, _ in rows)
    lines.extend(f"  {key:<{width}}  {value}" for key, value in rows)
    print("\n".join(lines), flush=True)


def _decoded(value: str) -> str:
    try:
        decoded = json.loads(value)
    except (TypeError, ValueError):
        return value
    return decoded if isinstance(decoded, str) else value


# --- predict --------------------------------------------------------------------------------------------------------


def run_predict(args: argparse.Namespace) -> int:
    from pipelines.local import endpoint as local_endpoint
    from pipelines.local import predict

    try:
        body, content_type = predict.build_request(args.images, args.top_k)
        if args.endpoint_name:
            response = predict.invoke_sagemaker(args.endpoint_name, body, content_type, args.region)
        else:
            url = args.endpoint
            if url is None:
                record = local_endpoint.status(args.workdir.resolve(), config.LOCAL_ENDPOINT_NAME)
                if record is None or record["EndpointStatus"] != "InService":
                    raise CommandError(
                        f"no local endpoint is running in {args.workdir}: pass --endpoint URL, --endpoint-name NAME, "
                        "or start one with 'python -m pipelines.run local --approve'"
                    )
                url = record["url"]
            response = predict.invoke_url(url, body, content_type)
    except predict.PredictError as error:
        raise CommandError(str(error)) from error
    if args.json:
        print(json.dumps(response, indent=2))
    else:
        print("\n".join(predict.format_predictions(args.images, response)))
    return 0


# --- endpoint ------------------------------------------------------------------------------------------------------


def run_endpoint(args: argparse.Namespace) -> int:
    from pipelines.local import endpoint as local_endpoint
    from pipelines.local.registry import LocalModelRegistry, RegistryError

    workdir = args.workdir.resolve()
    if args.action == "status":
        record = local_endpoint.status(workdir, args.name)
        if record is None:
            print(f"{args.name}: not deployed (no record in {workdir / local_endpoint.ENDPOINTS_DIR})")
            return 0
        print(
            f"{args.name}: {record['EndpointStatus']} at {record['url']} (pid {record['pid']}), serving "
            f"{record['ModelPackageArn']}; log {record['log']}"
        )
        return 0
    if args.action == "stop":
        record = local_endpoint.stop(workdir, args.name)
        print(f"{args.name}: stopped (pid {record['pid']})" if record else f"{args.name}: was not running")
        return 0
    registry = LocalModelRegistry(workdir)
    try:
        package = registry.describe(args.group, args.version) if args.version else registry.latest_approved(args.group)
    except RegistryError as error:
        raise CommandError(str(error)) from error
    if package is None:
        raise CommandError(f"{args.group} has no approved version: approve one with 'local-models --approve N'")
    if package["ModelApprovalStatus"] != "Approved":
        raise CommandError(
            f"version {package['ModelPackageVersion']} is {package['ModelApprovalStatus']}: approve it first "
            f"('python -m pipelines.run local-models --approve {package['ModelPackageVersion']}')"
        )
    return _deploy(workdir, args.name, package, args.port, args.ray)


def _deploy(workdir: Path, name: str, package: dict[str, Any], port: int, ray: bool = False) -> int:
    from pipelines.local import endpoint as local_endpoint

    try:
        record = local_endpoint.deploy(workdir, name, package, port=port, ray=ray)
    except local_endpoint.EndpointError as error:
        raise CommandError(str(error)) from error
    state = "already serving" if record.get("unchanged") else "serving"
    print(f"{name}: {state} version {package['ModelPackageVersion']} at {record['url']} (pid {record['pid']})")
    return 0


# --- local-models --------------------------------------------------------------------------------------------------


def run_models(args: argparse.Namespace) -> int:
    from pipelines.local.registry import LocalModelRegistry, RegistryError, accuracy_of

    workdir = args.workdir.resolve()
    registry = LocalModelRegistry(workdir)
    try:
        if args.approve is not None:
            package = registry.update_approval(args.group, args.approve, "Approved", "approved with local-models")
            print(f"{package['ModelPackageArn']}: Approved")
            if not args.no_deploy:
                return _deploy(workdir, args.endpoint_name, package, args.port, args.ray)
            return 0
        if args.reject is not None:
            package = registry.update_approval(args.group, args.reject, "Rejected", "rejected with local-models")
            print(f"{package['ModelPackageArn']}: Rejected")
            return 0
    except RegistryError as error:
        raise CommandError(str(error)) from error
    packages = registry.list_model_packages(args.group)
    if not packages:
        print(f"{args.group}: no versions in {registry.path}")
        return 0
    print(f"{'version':>7}  {'status':<22} {'accuracy':>8}  {'run':<9} created")
    for package in packages:
        print(
            f"{package['ModelPackageVersion']:>7}  {package['ModelApprovalStatus']:<22} {accuracy_of(package):>8}  "
            f"{package['CustomerMetadataProperties'].get('run', '?'):<9} {package['CreationTime']}"
        )
    return 0
