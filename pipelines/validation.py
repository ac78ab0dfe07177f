"""The rules every value of a run is checked against before anything runs, in one place.

- **Names that become paths** (an endpoint's, a model package group's) match SageMaker's own pattern for that kind
  of resource (``definition.names.SAGEMAKER_NAME_PATTERNS``), so a name is never a path.
- **Pipeline parameters**: the type and allowed values the definition declares (``parameter_overrides``),
  the bounds ``config.PARAMETER_BOUNDS`` holds, and SageMaker's API rules (botocore's shapes) at every place of the
  definition the value lands: ``MaxNumberOfTrainingJobs`` at least 1, an instance type SageMaker knows, ...
- **Script arguments**: every job step's arguments, resolved with the run's values, parsed by that script's own
  parser (``get_args_parser()`` of entrypoints/train.py, steps/preprocess.py, steps/evaluate.py) and its own
  cross-checks, so a value the script would refuse after an hour of other steps is refused now, in its words.
- **Fixed hyperparameters** (``--hp``) reach every training job as given: one that a pipeline parameter, the
  container contract or the local executor sets instead is refused, naming what sets it.

``python -m pipelines.run local`` applies all of them before its run folder exists; ``definition``/``upsert`` and
``start`` apply them to the definition they send or start. Nothing here imports the SageMaker SDK or torch until
a check needs it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines import config
from pipelines.definition.check import check_definition, iter_references, iter_steps
from pipelines.definition.expressions import Scope, as_text, is_expression
from pipelines.definition.hyperparameters import (
    TOOLKIT_PARAMETERS,
    TOOLKIT_PREFIX,
    decode_hyperparameter,
    hyperparameter_flags,
    split_hyperparameters,
)
from pipelines.definition.names import parse_number
from pipelines.util.errors import CommandError

# The scripts the definition runs, by the file name its entrypoint names, and the module that is that file here.
SCRIPT_MODULES = {"preprocess.py": "steps.preprocess", "evaluate.py": "steps.evaluate", "train.py": "entrypoints.train"}


# --- names, ports and bounded values (also argparse types, so a flag is refused as it is read) -----------------------


def port_argument(text: str) -> int:
    low, high = config.LOCAL_PORT_RANGE
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not low <= port <= high:
        raise argparse.ArgumentTypeError(f"a port is {low} to {high} ({low}: any free port), got {port}")
    return port


def bound_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is outside config.PARAMETER_BOUNDS[name], or None."""
    if name not in config.PARAMETER_BOUNDS:
        return None
    low, high, why = config.PARAMETER_BOUNDS[name]
    if not low <= float(value) <= high:
        return f"{name}={value} is outside {low:g} to {high:g} ({why})"
    return None


def parameter_argument(name: str, kind: type) -> Callable[[str], int | float]:
    """The argparse type of a shorthand flag for parameter ``name``: its type, then its bounds."""

    def parse(text: str) -> int | float:
        try:
            value = parse_number(kind, text)
        except ValueError:
            wanted = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {wanted} in ASCII digits, got {text!r}") from None
        problem = bound_problem(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def parameter_overrides(definition: dict[str, Any], overrides: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """--param pairs checked against the pipeline's declared parameters (name, type, allowed values)."""
    declared = {parameter["Name"]: parameter for parameter in definition.get("Parameters", [])}
    checked: dict[str, str] = {}
    for name, value in overrides:
        parameter = declared.get(name)
        if parameter is None:
            from pipelines.pipeline import OPTIONAL_PARAMETERS, missing_parameter_hint

            if name in OPTIONAL_PARAMETERS:
                raise CommandError(f"--param {name}: {missing_parameter_hint(name)}")
            raise CommandError(f"--param {name}: no such pipeline parameter; the parameters are {', '.join(declared)}")
        kind = parameter.get("Type", "String")
        try:
            if kind in ("Integer", "Float"):
                parse_number(int if kind == "Integer" else float, value)
        except ValueError as error:
            wanted = "an integer" if kind == "Integer" else "a number"
            raise CommandError(
                f"--param {name}={value}: {name} takes {wanted} in plain ASCII digits, the only form SageMaker reads"
            ) from error
        if kind == "Boolean" and value.lower() not in ("true", "false"):
            raise CommandError(f"--param {name}={value}: {name} takes true or false")
        allowed = parameter.get("EnumValues")
        if allowed and value not in allowed:
            raise CommandError(f"--param {name}={value}: {name} takes one of {', '.join(allowed)}")
        checked[name] = value
    return [{"Name": name, "Value": value} for name, value in checked.items()]


# --- the definition's values, resolved with the run's parameters --------------------------------------------------


def _resolved(value: Any, parameters: Mapping[str, Any]) -> Any:
    """``value`` with each expression that reads these parameters alone evaluated (the others are known only during
    the run)."""
    return Scope(dict(parameters), {}).resolve_known(value)


def _origin(value: Any, key: str, fixed: Mapping[str, Any]) -> str:
    """Where a value of the definition comes from, as the user would change it."""
    parameters = sorted({r.split(".", 1)[1] for r in iter_references(value) if r.startswith("Parameters.")})
    if parameters:
        return ", ".join(f"--param {name}" for name in parameters)
    return f"--hp {key}" if key in fixed else "the preset"


# --- pipeline parameters --------------------------------------------------------------------------------------------


def parameter_values(definition: dict[str, Any], overrides: list[dict[str, str]]) -> dict[str, Any]:
    """Every declared parameter's value for this run (defaults, then overrides), typed as declared."""
    convert = {
        "Integer": lambda value: parse_number(int, value),
        "Float": lambda value: parse_number(float, value),
        "Boolean": lambda text: str(text).lower() == "true",
    }
    given = {item["Name"]: item["Value"] for item in overrides}
    values = {}
    for parameter in definition.get("Parameters", []):
        value = given.get(parameter["Name"], parameter.get("DefaultValue"))
        values[parameter["Name"]] = convert.get(parameter.get("Type", "String"), str)(value)
    return values


def parameter_problems(definition: dict[str, Any], values: Mapping[str, Any]) -> list[str]:
    """Each parameter's value against config.PARAMETER_BOUNDS and SageMaker's API shapes where it lands."""
    problems = [problem for name, value in values.items() if (problem := bound_problem(name, value))]
    within = {name: value for name, value in values.items() if not bound_problem(name, value)}
    return problems + shape_problems(definition, within)


def shape_problems(definition: dict[str, Any], values: Mapping[str, Any]) -> list[str]:
    """Each parameter's value against SageMaker's API shapes where it lands in ``definition``: the rules of any
    definition, none of this project's."""
    problems = []
    before = set(check_definition(_resolved(definition, {})))
    for name, value in values.items():
        placed = _resolved(definition, {name: value})
        for problem in check_definition(placed):
            if problem not in before and not problem.startswith(f"parameter {name} is declared but never used"):
                problems.append(f"{name}={value}: {_shortened(problem)}")
    return problems


def _shortened(problem: str, shown: int = 6) -> str:
    """A problem with a long list of allowed values (instance types: 150) cut to its first few."""

    def cut(match: re.Match[str]) -> str:
        values = re.findall(r"'[^']*'", match.group(0))
        return f"[{', '.join(values[:shown])}, ... ({len(values)} in all)]"

    return re.sub(r"\[(?:'[^']*', ){" + str(shown) + r",}'[^']*'\]", cut, problem)


# --- fixed hyperparameters --------------------------------------------------------------------------------------------


def _hyperparameters(step: dict[str, Any]) -> dict[str, Any] | None:
    """The hyperparameters every training job of a step starts with (a tuning step's static ones); None for a step
    that starts no training job."""
    arguments = step.get("Arguments", {})
    if step.get("Type") == "Tuning":
        return arguments.get("TrainingJobDefinition", {}).get("StaticHyperParameters", {})
    return arguments.get("HyperParameters", {}) if step.get("Type") == "Training" else None


def fixed_hyperparameter_problems(definition: dict[str, Any], fixed: Mapping[str, Any], local: bool) -> list[str]:
    """``--hp`` values that would not reach every training job as given, and what sets each instead."""
    managed = set(config.CONTAINER_MANAGED_TRAINING_FLAGS)
    local_flags = {flag[2:] for flag in config.LOCAL_TRAINING_EXTRA_ARGUMENTS if flag.startswith("--")} if local else ()
    problems = []
    for key, value in fixed.items():
        shown = f"--hp {key}={json.dumps(value) if not isinstance(value, str) else value}"
        if key in managed:
            problems.append(f"{shown}: the container contract sets --{key} (SM_* folders and the job's configs); "
                            "leave it out")  # fmt: skip
            continue
        if key in TOOLKIT_PARAMETERS or key.startswith(TOOLKIT_PREFIX):
            problems.append(f"{shown}: the training toolkit keeps {key} for itself; leave it out")
            continue
        if key in local_flags:
            problems.append(f"{shown}: the local executor passes {' '.join(config.LOCAL_TRAINING_EXTRA_ARGUMENTS)} "
                            "to every job (they share this machine's cores); leave it out")  # fmt: skip
            continue
        elsewhere = []
        jobs = [
            (step["Name"], found) for step in iter_steps(definition) if (found := _hyperparameters(step)) is not None
        ]
        for step, hyperparameters in jobs:
            given = hyperparameters.get(key)
            if given is None:
                elsewhere.append(f"{step} does not get it")
            elif iter_references(given):
                elsewhere.append(f"{step} takes {key} from {_origin(given, key, {})}")
            elif decode_hyperparameter(given) != value:
                elsewhere.append(f"{step} gets {key}={decode_hyperparameter(given)!r}")
        if elsewhere:
            problems.append(f"{shown} does not reach the training jobs as given: {'; '.join(elsewhere)}")
    return problems


# --- the scripts' own parsers ---------------------------------------------------------------------------------------


class _Refused(Exception):
    """What a script's parser said (its ``parser.error``), raised instead of exiting."""


def _raise_refusal(message: str) -> None:
    raise _Refused(message)


def _flag_of(message: str) -> str | None:
    match = re.match(r"argument (--?[\w-]+)", message) or re.match(r"unrecognized arguments: (--?[\w-]+)", message)
    return match.group(1) if match else None


def _without(arguments: list[str], flag: str | None) -> list[str]:
    """The arguments without ``flag`` and its value (so the next parse can find the next problem)."""
    if flag is None or flag not in arguments:
        return []
    index = arguments.index(flag)
    has_value = index + 1 < len(arguments) and not arguments[index + 1].startswith("--")
    return arguments[:index] + arguments[index + 2 if has_value else index + 1 :]


def _parse_all(
    module: Any,
    arguments: list[str],
    origins: Mapping[str, str],
    cross_check: Callable[[Any, Any, Any], None] | None,
) -> list[str]:
    """Every refusal of the script's parser (and cross-check), one per flag, each naming where the value came from."""
    problems: list[str] = []
    remaining = list(arguments)
    while remaining is not None:
        parser = module.get_args_parser()
        parser.error = _raise_refusal  # type: ignore[method-assign]
        try:
            parsed = parser.parse_args(remaining)
            if cross_check is not None:
                cross_check(module, parser, parsed)
            return problems
        except _Refused as refusal:
            message = str(refusal)
        except Exception as error:  # a script's own error type (PreprocessError, ...): its message names the flag
            message = str(error)
        flag = _flag_of(message) or next((f for f in origins if f"{f} " in message), None)
        source = origins.get(flag or "", "")
        problems.append(f"{message}" + (f" (from {source})" if source else ""))
        shorter = _without(remaining, flag)
        remaining = shorter if flag and len(shorter) < len(remaining) else None
    return problems


def _processing_arguments(step: dict[str, Any], parameters: Mapping[str, Any]) -> tuple[str, list[str], dict[str, str]]:
    app = step["Arguments"].get("AppSpecification", {})
    script = str((app.get("ContainerEntrypoint") or [""])[-1]).rsplit("/", 1)[-1]
    arguments: list[str] = []
    origins: dict[str, str] = {}
    for item in app.get("ContainerArguments", []):
        value = _resolved(item, parameters)
        if is_expression(value):  # reads a step's property: known only during the run
            if arguments and arguments[-1].startswith("--"):
                arguments.pop()
            continue
        if iter_references(item) and arguments and arguments[-1].startswith("--"):
            origins[arguments[-1]] = _origin(item, "", {})
        arguments.append(as_text(value))
    return script, arguments, origins


def _training_arguments(
    hyperparameters: Mapping[str, Any], parameters: Mapping[str, Any], fixed: Mapping[str, Any]
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(script, the script's hyperparameters known before the run, decoded and split from the toolkit's own as the
    toolkit does, flag -> where its value comes from); a tuned value, picked by the tuning step, is left out."""
    resolved = _resolved(dict(hyperparameters), parameters)
    toolkit, known = split_hyperparameters({k: as_text(v) for k, v in resolved.items() if not is_expression(v)})
    origins = {f"--{key}": _origin(hyperparameters[key], key, fixed) for key in known}
    return str(toolkit.get("sagemaker_program", "")), known, origins


def _range_values(parameter_ranges: Mapping[str, Any]) -> dict[str, list[str]]:
    """Every value the tuner may give each tuned hyperparameter, at its ends: min and max, or every category."""
    values: dict[str, list[str]] = {}
    for kind in ("ContinuousParameterRanges", "IntegerParameterRanges"):
        for item in parameter_ranges.get(kind, []):
            values[item["Name"]] = [str(item["MinValue"]), str(item["MaxValue"])]
    for item in parameter_ranges.get("CategoricalParameterRanges", []):
        values[item["Name"]] = [str(decode_hyperparameter(value)) for value in item["Values"]]
    return values


def _check_training_settings(module: Any, parser: Any, parsed: Any) -> None:
    """train.py's cross-flag checks (blocks of the architecture, resize >= input size, the device, ...)."""
    module.resolve_settings(parsed, parser)


def _check_processing_arguments(module: Any, parser: Any, parsed: Any) -> None:
    check = getattr(module, "check_arguments", None)
    if check is not None:
        check(parsed)


def _step_checks(
    step: dict[str, Any], parameters: Mapping[str, Any], fixed: Mapping[str, Any], local: bool
) -> tuple[str, list[list[str]], dict[str, str], Callable[[Any, Any, Any], None] | None] | None:
    """(script, its argument lists to parse, flag -> origin, cross-check) of a job step; None for other steps.

    A tuning step gets one list per value at the ends of its ranges. ``local``: the job runs here, with the local
    executor's flags, so train.py's cross-checks that read the machine (the device, a weights file) run too.
    """
    arguments = step.get("Arguments", {})
    if step.get("Type") == "Processing":
        script, flags, origins = _processing_arguments(step, parameters)
        return script, [flags], origins, _check_processing_arguments
    hyperparameters = _hyperparameters(step)
    if hyperparameters is None:
        return None
    script, known, origins = _training_arguments(hyperparameters, parameters, fixed)
    ranges = _range_values(arguments.get("HyperParameterTuningJobConfig", {}).get("ParameterRanges", {}))
    origins.update({f"--{name}": f"the tuner's range of {name}" for name in ranges})
    count = max((len(values) for values in ranges.values()), default=1)
    extra = list(config.LOCAL_TRAINING_EXTRA_ARGUMENTS) if local else []
    runs = [
        hyperparameter_flags({**known, **{k: v[min(i, len(v) - 1)] for k, v in ranges.items()}}) + extra
        for i in range(count)
    ]
    return script, runs, origins, _check_training_settings if local else None


def _acceptance_mark(folder: Path | None, script: str, runs: list[list[str]], local: bool) -> Path | None:
    """Where the mark that ``script``'s code accepted ``runs`` is kept: named by that code's content and the lists."""
    if folder is None:
        return None
    from pipelines.util import fsutil

    spec = importlib.util.find_spec(SCRIPT_MODULES[script])
    code = Path(str(spec.origin)).parent if spec is not None else None
    if code is None or not code.is_dir():
        return None
    return folder / fsutil.json_hash(
        {"code": fsutil.content_hash(code), "script": script, "runs": runs, "local": local}
    )


def script_argument_problems(
    definition: dict[str, Any],
    parameters: Mapping[str, Any],
    fixed: Mapping[str, Any],
    local: bool,
    accepted: Path | None = None,
) -> list[str]:
    """Every job step's arguments known before the run, refused by the script's own parser and checks, if at all.

    ``accepted``: a folder of marks, one per argument lists the same script code accepted before; those are not
    parsed again, so a run with nothing changed does not import the scripts (train.py brings torch: seconds).
    """
    refusals: dict[str, list[str]] = {}  # "<script> refuses <what>" -> the steps it refuses it in
    with tempfile.TemporaryDirectory(prefix="channel-") as channel:
        for step in iter_steps(definition):
            checks = _step_checks(step, parameters, fixed, local)
            if checks is None or checks[0] not in SCRIPT_MODULES:
                continue
            script, runs, origins, cross_check = checks
            mark = _acceptance_mark(accepted, script, runs, local)
            if mark is not None and mark.exists():
                continue
            module = importlib.import_module(SCRIPT_MODULES[script])
            channels = (
                ["--train-dir", channel, "--valid-dir", channel] if cross_check is _check_training_settings else []
            )
            found = [
                problem for flags in runs for problem in _parse_all(module, flags + channels, origins, cross_check)
            ]
            for problem in found:
                steps = refusals.setdefault(f"{script} refuses {problem}", [])
                if step["Name"] not in steps:
                    steps.append(step["Name"])
            if not found and mark is not None:  # an empty file, made whole or not at all
                mark.parent.mkdir(parents=True, exist_ok=True)
                mark.touch()
    return [f"{', '.join(steps)}: {refusal}" for refusal, steps in refusals.items()]


def run_problems(
    definition: dict[str, Any],
    parameters: Mapping[str, Any],
    fixed: Mapping[str, Any],
    *,
    local: bool,
    accepted: Path | None = None,
) -> list[str]:
    """Everything wrong with this run's values, before anything runs (an empty list: nothing); ``accepted``: see
    :func:`script_argument_problems`."""
    problems = parameter_problems(definition, parameters)
    problems += fixed_hyperparameter_problems(definition, fixed, local)
    if not problems:  # a refused parameter would be refused again, less clearly, by the script it reaches
        problems += script_argument_problems(definition, parameters, fixed, local, accepted)
    return problems
