"""AWS's own rules for names, ARNs and numbers that several parts check: SageMaker names that become paths,
Lambda function names, the ARN partition of a region, the forms of Integer and Float pipeline parameter values."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

# SageMaker's own name patterns (botocore's service model; a test keeps them equal) for the names that become folder
# and file names in the workdir: an endpoint's record and model folders, a model package group's registry folder.
SAGEMAKER_NAME_PATTERNS: dict[str, tuple[str, str]] = {  # kind -> (SageMaker's shape, its pattern; 1-63 chars)
    "endpoint": ("EndpointName", r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}"),
    "model package group": ("EntityName", r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}"),
}
# A Lambda function name (CreateFunction's FunctionName without the ARN forms).
LAMBDA_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")

# SageMaker's own forms of Integer and Float parameter values: ASCII digits, an optional sign, for a float a
# decimal point and exponent. Python's int() and float() also take "1_0", digits of other scripts (an Arabic-Indic
# one) and " 3 ", which SageMaker refuses or reads otherwise: a value is matched against these before it is read.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_number(kind: type, value: Any) -> int | float:
    """``value`` as ``kind`` (int or float) if SageMaker reads it as one; ``ValueError`` otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return kind(value)  # a definition's own default
    pattern = _INTEGER if kind is int else _FLOAT
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{value!r} is not a plain ASCII decimal {'integer' if kind is int else 'number'}")
    return kind(value)


def partition_for_region(region: str) -> str:
    """The ARN partition of a region (aws, aws-cn or aws-us-gov)."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def check_name(kind: str, name: Any) -> str:
    """``name`` if it is a valid SageMaker name of ``kind`` (see SAGEMAKER_NAME_PATTERNS), else ValueError."""
    shape, pattern = SAGEMAKER_NAME_PATTERNS[kind]
    if not isinstance(name, str) or not re.fullmatch(pattern, name):
        raise ValueError(
            f"{kind} name {name!r} is not a SageMaker {shape}: 1 to 63 letters, digits and hyphens, starting and "
            "ending with a letter or digit (it names files in the workdir, so it may not be a path)"
        )
    return name


def name_argument(kind: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return check_name(kind, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse
