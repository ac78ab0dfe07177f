"""Packaging for the image-classification SageMaker pipeline.

Install for development and tests with ``pip install -e ".[dev]"`` (see README.md).
"""

from pathlib import Path

from setuptools import find_packages, setup

RUNTIME_REQUIREMENTS = [
    "sagemaker>=2.257,<3",
    "boto3>=1.34",
    "torch>=2.4",
    "torchvision>=0.19",
    "pillow>=10",
    "numpy>=1.26",
    "scikit-learn>=1.4",  # the built-in demo dataset (digits) and evaluation metrics
    "matplotlib>=3.8",  # confusion matrix and training-curve pictures
    "tensorboard>=2.15",  # TensorBoard scalars from the training script
    "tqdm>=4.66",
    "onnx>=1.16",  # the serving handlers export the network to ONNX in memory at load time...
    "onnxruntime>=1.18",  # ...and run it with ONNX Runtime where installed (local endpoints, evaluation)
    "pyyaml>=6",  # the local endpoint reads the artifact's config.yaml; bootstrap reads infra/project.yml
    "packaging<25",  # sagemaker 2.x's bound, kept when Ray is installed beside it
    # MLflow tracking (entrypoints/tracking.py; local runs track into <workdir>/mlflow.db): the client without its
    # server and UI, plus what its SQLite store needs. The UI (`mlflow ui`) needs the full package: the "ui" extra.
    "mlflow-skinny>=3.13,<4",
    "sqlalchemy>=2",
    "alembic>=1.13",
]

# `mlflow ui` / `mlflow server` over the local store: the full MLflow (its server, UI and their dependencies).
MLFLOW_UI_REQUIREMENTS = ["mlflow>=3.13,<4"]

# The local endpoint's --ray host: the Ray of AWS's Ray Serve inference image (v1.4). protobuf 7 breaks Ray.
RAY_REQUIREMENTS = ["ray[serve]==2.57.0", "protobuf<7"]

DEV_REQUIREMENTS = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "pytest-xdist>=3.6",  # the suite runs on two workers (pyproject.toml's addopts)
    "moto[s3,sagemaker,lambda,events,sqs,iam,sts,cloudformation,codebuild,codepipeline]>=5.0,<6",
    "cfn-lint>=1.20",  # lints the CloudFormation template in the tests
    "ruff>=0.6",
    "sagemaker-pytorch-inference>=2.0.25",  # the serving toolkit the handler tests run under
    "sagemaker-training>=5.1,<6",  # the training toolkit: tests launch train.py the way the container does
    *RAY_REQUIREMENTS,  # tests run the artifact's app on a real Ray Serve cluster
    *MLFLOW_UI_REQUIREMENTS,  # tests track into a real `mlflow server`
]

setup(
    name="image-classification-pipeline",
    version="0.1.0",
    description=(
        "SageMaker Pipelines MLOps workflow that fine-tunes torchvision CNNs for image classification, "
        "runnable whole on one machine"
    ),
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pipelines", "pipelines.*", "steps", "entrypoints"]),
    package_data={"entrypoints": ["*.txt", "*.yaml"], "steps": ["*.json", "*.txt"], "pipelines.aws.iam": ["*.json"]},
    install_requires=RUNTIME_REQUIREMENTS,
    extras_require={"dev": DEV_REQUIREMENTS, "ray": RAY_REQUIREMENTS, "ui": MLFLOW_UI_REQUIREMENTS},
    entry_points={"console_scripts": ["image-pipeline=pipelines.run:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "License :: OSI Approved :: Apache Software License",
    ],
)
