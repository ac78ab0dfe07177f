"""The whole pipeline on one machine: ``python -m pipelines.run local``.

The same DAG as the SageMaker pipeline (Preprocess -> Tune -> Train -> Evaluate -> CheckAccuracy ->
Register, then deploy on approval), running the same scripts as subprocesses under the same container
contract (``/opt/ml`` folders rooted in the run folder, ``SM_*`` environment, hyperparameters as
``--key value`` flags), with no AWS account and no Docker.

Modules: :mod:`.containers` (the SageMaker processing and training container contract), :mod:`.tuning`
(sampling the tuner's ranges), :mod:`.cache` (step caching), :mod:`.registry` (the local model registry),
:mod:`.server` and :mod:`.endpoint` (the local endpoint), :mod:`.runner` (the DAG), :mod:`.cli` (commands).
Nothing here imports torch: the scripts do, in their own processes.
"""
