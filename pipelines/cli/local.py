"""Commands of the local pipeline: ``local``, ``predict``, ``endpoint``, and the older ``local-status`` and
``local-models``.

    python -m pipelines.run local [--data PATH] [--preset demo] [--param Name=Value] [--approve] ...
    python -m pipelines.run local --definition FILE [--object s3://BUCKET/KEY=PATH ...] [--param Name=Value]
    python -m pipelines.run predict IMAGE [IMAGE ...] [--endpoint URL | --endpoint-name NAME] [--local]
    python -m pipelines.run endpoint status|stop [--workdir runs]

``status``, ``models``, ``approve``, ``reject`` and ``deploy`` work on a workdir with ``--local`` (they live
with their SageMaker spellings, one code path for both). ``local-status``, ``local-models`` and ``endpoint
start`` are their older spellings, kept working for one release but left out of ``--help``.

Every flag is checked as it is read, by the rules of :mod:`pipelines.validation` (names that become paths
against SageMaker's patterns, ports, the bounds of the shorthand parameters), and a state file that cannot be
read (registry, endpoint record) gives one line naming it and what to do.

Nothing here imports torch, boto3 or the SageMaker SDK at start: ``local`` begins at once and the steps'
scripts import what they need in their own processes.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pipelines import config, validation
from pipelines.cli import backend
from pipelines.cli.sagemaker import add_model_package_group_argument, add_param_argument, add_shape_arguments
from pipelines.definition import hyperparameters, names
from pipelines.util.errors import CommandError

EXIT_PIPELINE_FAILED = 1


def _positive_int(text: str) -> int:
    try:
        value = names.parse_number(int, text)  # what SageMaker reads as the parameter it becomes
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


# Flags kept as conveniences: each sets one pipeline parameter (as --param Name=Value would): flag -> (the
# parameter, how the flag's value is read).
PARAMETER_FLAGS = {
    "--trials": ("MaxTuningJobs", _positive_int),
    "--parallel": ("MaxParallelTuningJobs", _positive_int),
    "--tuning-epochs": ("TuningEpochs", _positive_int),
    "--epochs": ("TrainingEpochs", _positive_int),
    "--image-size": ("ImageSize", validation.parameter_argument("ImageSize", int)),
    "--threshold": ("AccuracyThreshold", validation.parameter_argument("AccuracyThreshold", float)),
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    for add_command in (
        _add_local_command,
        _add_predict_command,
        _add_endpoint_command,
        _add_models_command,
        _add_status_command,
    ):
        add_command(subparsers)


def _add_local_command(subparsers: argparse._SubParsersAction) -> None:
    local = subparsers.add_parser(
        "local",
        help="run the pipeline's definition on this machine (no AWS, no Docker)",
        description="Build the pipeline's definition offline (the one `definition` writes and `upsert` sends) and "
        "execute it here: Preprocess -> Tune -> Train -> Evaluate -> CheckAccuracy -> Register -> Deploy, each "
        "step under the SageMaker container contract, with step caching, a local model registry and a local "
        "endpoint. Without --data it runs the demo preset on the built-in demo data (scikit-learn's digits).",
    )
    local.add_argument("--data", type=Path, default=None, help="archive or folder of images (default: built-in demo)")
    backend.add_workdir_argument(local)
    add_shape_arguments(
        local,
        "builder options: 'demo' (a small CNN from random weights on small images, config.DEMO_*) or 'default' "
        "(the production pipeline's) (default: demo without --data, default with it)",
    )
    add_param_argument(
        local,
        "set a pipeline parameter for this run, checked as `start --param` checks it, repeatable, e.g. "
        "--param Architecture=resnet34 --param ImageSize=48",
    )
    conveniences = local.add_argument_group("shorthands, each for one --param")
    conveniences.add_argument(
        "--approve",
        action="store_true",
        help="--param ModelApprovalStatus=Approved: register the version Approved, and the Deploy step serves it on "
        "a local endpoint (stop it with 'endpoint stop')",
    )
    for flag, (name, kind) in PARAMETER_FLAGS.items():
        value = "X" if name == "AccuracyThreshold" else "N"
        conveniences.add_argument(flag, type=kind, default=None, help=f"--param {name}={value}")
    local.add_argument("--no-cache", dest="cache", action="store_false", help="run every step, reuse nothing")
    backend.add_local_endpoint_arguments(local)
    add_model_package_group_argument(
        local, "model package group: the ModelPackageGroupName default and the deploy function's group", dest="group"
    )
    local.add_argument("--quiet", action="store_true", help="print only the summary")
    _add_definition_arguments(local)
    tracking = local.add_mutually_exclusive_group()
    tracking.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="MLflow tracking URI for the Tune, Train and Evaluate jobs, e.g. http://127.0.0.1:5000 (default: "
        f"sqlite:///<workdir>/{LOCAL_TRACKING_DB}, opened with 'mlflow ui --backend-store-uri ...')",
    )
    tracking.add_argument("--no-tracking", dest="tracking", action="store_false", help="no MLflow tracking")
    local.set_defaults(func=run_local)


def _object_argument(text: str) -> tuple[str, Path]:
    """``s3://BUCKET/KEY=PATH``, split at the last '=' (keys may hold '=', as in ``date=2024/``)."""
    from pipelines.local.objectstore import ObjectStoreError, split_uri

    uri, separator, path = text.rpartition("=")
    if not separator or not uri or not path:
        raise argparse.ArgumentTypeError(f"expected s3://BUCKET/KEY=PATH, got {text!r}")
    try:
        split_uri(uri)
    except ObjectStoreError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not Path(path).exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist: pass a file or a folder to put at {uri}")
    return uri, Path(path)


def _add_definition_arguments(local: argparse.ArgumentParser) -> None:
    group = local.add_argument_group("any definition: run a definition JSON instead of building this pipeline's")
    group.add_argument(
        "--definition",
        type=Path,
        default=None,
        metavar="FILE",
        help="run this definition JSON as it is (the engine knows no project: this project's flags and checks "
        "apply only when its jobs run this project's code); the builder's flags do not apply",
    )
    group.add_argument(
        "--object",
        dest="objects",
        type=_object_argument,
        action="append",
        default=[],
        metavar="s3://BUCKET/KEY=PATH",
        help="with --definition: put a local file (or a folder's files) at this S3 URI of the local object store "
        "first, as upsert uploads the code objects; repeatable",
    )
    group.add_argument(
        "--pipeline-name", default=None, help="with --definition: the pipeline's name in ARNs (default: FILE's stem)"
    )


# What only shapes the definition the builder makes (with its default): refused with --definition FILE.
BUILDER_ONLY_FLAGS = {
    "data": ("--data", None),
    "preset": ("--preset", None),
    "hyperparameters": ("--hp", []),
    "debugger": ("--no-debugger", True),
    "torch_distributed": ("--torch-distributed", False),
    "int8_serving": ("--no-int8", True),
    "skip_deploy_wiring": ("--skip-deploy-wiring", False),
}


def _check_definition_flags(args: argparse.Namespace) -> None:
    """--definition runs the file as it is: a builder flag would silently do nothing, so it is refused; --object
    and --pipeline-name mean nothing without it."""
    if args.definition is None:
        if args.objects or args.pipeline_name:
            raise CommandError("--object and --pipeline-name go with --definition FILE; leave them out or add it")
        return
    given = [flag for key, (flag, default) in BUILDER_ONLY_FLAGS.items() if getattr(args, key) != default]
    if given:
        raise CommandError(
            f"{', '.join(given)} only shape the definition the builder makes; --definition {args.definition} runs "
            "the file as it is: leave them out (use --object and --param for its inputs)"
        )
    if not args.definition.is_file():
        raise CommandError(f"--definition {args.definition} is not a file: pass a definition JSON")


LOCAL_TRACKING_DB = "mlflow.db"


def tracking_uri(args: argparse.Namespace) -> str | None:
    """``--tracking-uri``, else the workdir's SQLite store; None with ``--no-tracking``."""
    if not getattr(args, "tracking", True):
        return None
    return args.tracking_uri or f"sqlite:///{(args.workdir.resolve() / LOCAL_TRACKING_DB).as_posix()}"


def _add_predict_command(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser(
        "predict",
        help="send images to an endpoint and print the top classes",
        description="Send images to a local endpoint (--endpoint URL, default: the local endpoint recorded in "
        "--workdir) or a SageMaker endpoint (--endpoint-name, needs AWS credentials) and print the top-k classes.",
    )
    predict.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    target = predict.add_mutually_exclusive_group()
    target.add_argument("--endpoint", default=None, help="URL of an endpoint, e.g. http://127.0.0.1:8080")
    target.add_argument(
        "--endpoint-name",
        default=None,
        help="name of a SageMaker endpoint (sagemaker-runtime); with --local, of a local one",
    )
    predict.add_argument("--region", default=None, help="AWS region of --endpoint-name (default: AWS_REGION)")
    predict.add_argument(
        "--local", action="store_true", help="a local endpoint of --workdir (the default without --endpoint-name)"
    )
    predict.add_argument(
        "--top-k", type=_positive_int, default=None, help="classes per image (default: the endpoint's)"
    )
    backend.add_workdir_argument(predict)
    predict.add_argument("--json", action="store_true", help="print the endpoint's JSON answer as is")
    predict.set_defaults(func=run_predict)


def _add_endpoint_command(subparsers: argparse._SubParsersAction) -> None:
    endpoint = subparsers.add_parser(
        "endpoint",
        help="show or stop the local endpoint (deploy one with `deploy --local` or `approve --local`)",
        description="The local endpoint is a background server process recorded in <workdir>/endpoints/. "
        "'start' is the older spelling of `deploy --local`.",
    )
    endpoint.add_argument("action", choices=("status", "start", "stop"), help="what to do")
    backend.add_workdir_argument(endpoint)
    add_model_package_group_argument(endpoint, "model package group (start)", dest="group")
    endpoint.add_argument(
        "--version", type=_positive_int, default=None, help="version to serve (start; default: the newest approved)"
    )
    backend.add_local_endpoint_arguments(endpoint, "--name")
    endpoint.set_defaults(func=run_endpoint)


def _add_models_command(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser(  # no help=: an older spelling, out of --help (`models/approve/reject --local`)
        "local-models",
        description="The local model registry (<workdir>/model-registry.json). Approving a version deploys it to "
        "the local endpoint, as the deploy Lambda does on SageMaker.",
    )
    backend.add_workdir_argument(models)
    add_model_package_group_argument(models, "model package group", dest="group")
    decision = models.add_mutually_exclusive_group()
    decision.add_argument("--approve", type=_positive_int, metavar="VERSION", default=None, help="approve and deploy")
    decision.add_argument("--reject", type=_positive_int, metavar="VERSION", default=None, help="reject a version")
    backend.add_local_deploy_arguments(models)
    models.set_defaults(func=run_models)


def _add_status_command(subparsers: argparse._SubParsersAction) -> None:
    runs = subparsers.add_parser(  # no help=: an older spelling, out of --help (`status --local`)
        "local-status",
        description="Like `status` for the runs of `local`: the newest run (or RUN) with its steps, or every run "
        "with --all, read from <workdir>/run-NNNN/run.json. A run left Executing by a process that has gone "
        "(killed, or its machine restarted) shows as 'Stopped (process gone)'.",
    )
    runs.add_argument("run", nargs="?", default=None, help="run ID, e.g. run-0003 (default: the newest)")
    runs.add_argument("--all", action="store_true", help="one line per run")
    backend.add_workdir_argument(runs)
    runs.set_defaults(func=run_status)


# --- local --------------------------------------------------------------------------------------------------------


def local_parameters(args: argparse.Namespace) -> list[tuple[str, str]]:
    """--param pairs and the shorthand flags, each parameter given once."""
    pairs = list(args.params)
    shorthands = [(name, getattr(args, flag[2:].replace("-", "_"))) for flag, (name, _) in PARAMETER_FLAGS.items()]
    if args.approve:
        shorthands.append(("ModelApprovalStatus", "Approved"))
    for name, value in shorthands:
        if value is None:
            continue
        if any(given == name for given, _ in pairs):
            raise CommandError(f"{name} is given twice: by --param and by its shorthand flag; give it once")
        pairs.append((name, str(value)))
    return pairs


def run_local(args: argparse.Namespace) -> int:
    from pipelines import sdk

    sdk.quiet()  # the definition is built with the SDK: keep its import-time chatter off the terminal
    from pipelines.local.console import Console
    from pipelines.local.executor import DefinitionInvalid, PipelineFailed, RunStopped
    from pipelines.local.runner import InvalidOptions, LocalPipeline, LocalRunOptions

    if args.data is not None and not args.data.exists():
        raise CommandError(f"--data {args.data} does not exist: pass an archive (.zip, .tar.gz) or a folder of images")
    _check_definition_flags(args)
    options = LocalRunOptions(
        workdir=args.workdir,
        data=args.data,
        preset=args.preset,
        parameters=local_parameters(args),
        hyperparameters=dict(args.hyperparameters),
        debugger=args.debugger,
        torch_distributed=args.torch_distributed,
        int8_serving=args.int8_serving,
        deploy_step=not args.skip_deploy_wiring,
        deploy_function_name=args.deploy_function_name,
        model_package_group=args.group,
        cache=args.cache,
        endpoint_name=args.endpoint_name,
        port=args.port,
        ray=args.ray,
        definition_file=args.definition,
        objects=list(args.objects),
        pipeline_name=args.pipeline_name,
        tracking_uri=tracking_uri(args),
    )
    console = Console(quiet=args.quiet)
    pipeline = LocalPipeline(options, console)
    started = time.perf_counter()
    try:
        record = pipeline.run()
    except InvalidOptions as error:
        if len(error.problems) > 1:
            for problem in error.problems:
                print(f"refused: {problem}", file=sys.stderr)
            raise CommandError(f"{len(error.problems)} values refused (listed above); nothing ran") from error
        raise CommandError(f"{error}; nothing ran") from error
    except RunStopped as stop:
        where = f"{pipeline.run_id} is marked Stopped ({pipeline.run_dir})" if pipeline.run_id else "no run started"
        print(f"stopped by {stop.signal_name}: every job process was stopped; {where}", file=sys.stderr)
        return 128 + signal.Signals[stop.signal_name].value
    except DefinitionInvalid as invalid:
        for problem in invalid.problems:
            print(f"definition problem: {problem}", file=sys.stderr)
        print(
            f"error: the definition cannot run ({len(invalid.problems)} problem(s), listed above); no step ran; "
            f"see {pipeline.run_dir}",
            file=sys.stderr,
        )
        return EXIT_PIPELINE_FAILED
    except PipelineFailed as failure:
        print(
            f"error: {failure}; the run folder {pipeline.run_dir} is kept for inspection "
            f"({time.perf_counter() - started:.1f} s)",
            file=sys.stderr,
        )
        return EXIT_PIPELINE_FAILED
    if pipeline.project:
        print_summary(record, args.workdir)
    else:
        print_definition_summary(record)
    return 0


def print_definition_summary(record: dict[str, Any]) -> None:
    """The run of a definition that is not this project's: its steps and what it registered."""
    rows = [_run_row(record), *((step["StepName"], step["StepStatus"]) for step in record["PipelineExecutionSteps"])]
    package = record["Summary"].get("model_package")
    if package:
        rows.append(("registry", f"{package['ModelPackageArn']} {package['ModelApprovalStatus']}"))
    _print_rows(rows)


def _run_row(record: dict[str, Any]) -> tuple[str, str]:
    return "run", f"{record['RunId']} ({record['ElapsedSeconds']:.1f} s): {record['RunFolder']}"


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in rows)
    print("\n".join(["", "Summary", *(f"  {key:<{width}}  {value}" for key, value in rows)]), flush=True)


def print_summary(record: dict[str, Any], workdir: Path) -> None:
    summary = record["Summary"]
    tuned = summary.get("tuned_hyperparameters", {})
    best = " ".join(f"{key}={_decoded(value)}" for key, value in sorted(tuned.items()))
    package = summary.get("model_package", {})
    accuracy = summary.get("test_accuracy")
    rows = [
        _run_row(record),
        ("best hyperparameters", f"{best} ({summary.get('best_trial', '?')})"),
        ("test accuracy", f"{accuracy:.4f}" if accuracy is not None else "(not evaluated)"),
        ("confusion matrix", summary.get("confusion_matrix") or "(not written)"),
        (
            "registry",
            f"{package.get('ModelPackageArn', '?')} version {package.get('ModelPackageVersion', '?')} "
            f"{package.get('ModelApprovalStatus', '')}",
        ),
    ]
    answers = list(summary.get("lambda", {}).values())
    if "endpoint" in summary:
        url = summary["endpoint"]["url"]
        rows.append(("endpoint", f"{url} (try: python -m pipelines.run predict IMAGE --endpoint {url})"))
        rows.append(("stop it with", f"python -m pipelines.run endpoint stop --workdir {workdir}"))
    elif answers and answers[0].get("action") == "awaiting-approval":
        version = package.get("ModelPackageVersion", "N")
        awaiting = f"approve {version} --local --workdir {workdir}, or run with --approve"
        rows.append(("endpoint", f"none: version {version} awaits approval (python -m pipelines.run {awaiting})"))
    else:
        rows.append(("endpoint", "none: run with --approve, or 'python -m pipelines.run approve N --local'"))
    if "tracking" in summary:
        rows.append(("MLflow", f"{summary['tracking']['ui']} (experiment: the pipeline's name)"))
    _print_rows(rows)


def _decoded(value: str) -> str:
    decoded = hyperparameters.decode_hyperparameter(value)
    return decoded if isinstance(decoded, str) else value


# --- predict --------------------------------------------------------------------------------------------------------


def run_predict(args: argparse.Namespace) -> int:
    from pipelines.serving import endpoint as local_endpoint
    from pipelines.serving import predict

    try:
        body, content_type = predict.build_request(args.images, args.top_k)
        if args.endpoint_name and not args.local:
            response = predict.invoke_sagemaker(args.endpoint_name, body, content_type, args.region)
        else:
            url = args.endpoint
            if url is None:
                name = names.check_name("endpoint", args.endpoint_name or config.LOCAL_ENDPOINT_NAME)
                record = local_endpoint.status(args.workdir.resolve(), name)
                if record is None or record["EndpointStatus"] != "InService":
                    raise CommandError(
                        f"no local endpoint is running in {args.workdir}: pass --endpoint URL, --endpoint-name NAME, "
                        "or start one with 'python -m pipelines.run local --approve'"
                    )
                url = record["url"]
            response = predict.invoke_url(url, body, content_type)
    except (predict.PredictError, local_endpoint.EndpointError, ValueError) as error:
        raise CommandError(str(error)) from error
    if args.json:
        print(json.dumps(response, indent=2))
    else:
        print("\n".join(predict.format_predictions(args.images, response)))
    return 0


# --- endpoint ------------------------------------------------------------------------------------------------------


def run_endpoint(args: argparse.Namespace) -> int:
    from botocore.exceptions import ClientError

    from pipelines.serving import endpoint as local_endpoint
    from pipelines.util import fsutil

    workdir = args.workdir.resolve()
    try:
        if args.action == "status":
            return _print_endpoint(workdir, args.name)
        if args.action == "stop":
            record = local_endpoint.stop(workdir, args.name)
            _print_stopped(args.name, record)
            return 0
        client = backend.local_client(args)
        package = _package_to_serve(client, args.group, args.version)
        record = local_endpoint.deploy(workdir, args.name, package, port=args.port, ray=args.ray)
    except ClientError as error:
        raise CommandError(error.response["Error"]["Message"]) from error
    except (local_endpoint.EndpointError, fsutil.WorkdirBusy, fsutil.OutsideWorkdir) as error:
        raise CommandError(str(error)) from error
    except OSError as error:
        raise CommandError(backend.disk_error_line(error, args.workdir)) from error
    state = "already serving (nothing changed)" if record.get("unchanged") else "serving"
    print(f"{args.name}: {state} version {package['ModelPackageVersion']} at {record['url']} (pid {record['pid']})")
    return 0


def stored_form(package: dict[str, Any]) -> dict[str, Any]:
    """A described package as the registry keeps it (times as ISO text), as the endpoint's record takes it."""
    return {key: value.isoformat() if hasattr(value, "isoformat") else value for key, value in package.items()}


def _package_to_serve(client: Any, group: str, version: int | None) -> dict[str, Any]:
    """The version to serve (the newest approved without ``version``), its files checked against their hashes."""
    summaries = client.list_model_packages(ModelPackageGroupName=group, SortOrder="Descending")
    summaries = summaries["ModelPackageSummaryList"]
    if version is not None:
        summaries = [s for s in summaries if s["ModelPackageVersion"] == version]
        if not summaries:
            raise CommandError(f"{group} has no version {version}: see `models --local`")
    else:
        summaries = [s for s in summaries if s["ModelApprovalStatus"] == "Approved"][:1]
        if not summaries:
            raise CommandError(f"{group} has no approved version: approve one with 'approve N --local'")
    package = client.verified_package(summaries[0]["ModelPackageArn"])
    if package["ModelApprovalStatus"] != "Approved":
        raise CommandError(
            f"version {package['ModelPackageVersion']} is {package['ModelApprovalStatus']}: approve it first "
            f"('python -m pipelines.run approve {package['ModelPackageVersion']} --local')"
        )
    return stored_form(package)


def _print_endpoint(workdir: Path, name: str) -> int:
    from pipelines.serving import endpoint as local_endpoint

    record = local_endpoint.status(workdir, name)
    if record is None:
        print(f"{name}: not deployed (no record in {workdir / local_endpoint.ENDPOINTS_DIR})")
        return 0
    print(
        f"{name}: {record['EndpointStatus']} at {record['url']} (pid {record['pid']}), serving "
        f"{record['ModelPackageArn']}; log {record.get('log', '?')}"
    )
    return 0


def _print_stopped(name: str, record: dict[str, Any] | None) -> None:
    if record is None:
        print(f"{name}: was not running")
    elif record.get("damaged"):
        found = ", ".join(map(str, record["stopped_pids"])) or "none"
        print(f"{record['damaged']}\n{name}: stopped what was found of it (processes: {found}); record set aside as "
              f"{record['set_aside']}")  # fmt: skip
    else:
        print(f"{name}: stopped (pid {record['pid']})")


# --- local-models (the older spelling of models / approve / reject --local) -----------------------------------


def run_models(args: argparse.Namespace) -> int:
    from pipelines.cli import sagemaker

    args.local, args.model_package_group, args.description = True, args.group, None
    if args.approve is not None or args.reject is not None:
        approved = args.approve is not None
        args.model_package = str(args.approve if approved else args.reject)
        args.approval_status = "Approved" if approved else "Rejected"
        return sagemaker.cmd_set_approval(args)
    args.max, args.json = 1000, False
    return sagemaker.cmd_models(args)


# --- local-status --------------------------------------------------------------------------------------------------


def run_status(args: argparse.Namespace) -> int:
    from pipelines.local import runs

    workdir = args.workdir.resolve()
    try:
        if args.all:
            print("\n".join(runs.summary_lines(workdir)) or f"no runs in {workdir}")
            return 0
        print("\n".join(runs.detail_lines(workdir, args.run)))
    except runs.RunNotFound as error:
        raise CommandError(str(error)) from error
    return 0
