"""A pipeline definition executed on one machine: ``python -m pipelines.run local``.

The engine runs any definition from its JSON alone (``local --definition FILE``): the executor (:mod:`.executor`) with
one executor per step type (:mod:`.jobs`: Processing, Training, Tuning under the SageMaker container contract of
:mod:`.containers`, with the tuner's sampling in :mod:`.tuning`; :mod:`.control`: Condition, Fail, RegisterModel,
Lambda), expressions evaluated by :mod:`pipelines.definition.expressions`, S3 URIs mapped to the object store of
:mod:`.objectstore`, steps cached by :mod:`.cache`, versions kept by :mod:`.registry`. It knows no project. The runner
(:mod:`.runner`) is the one project-aware module: it builds the definition that ``upsert`` sends (same builder, same
options) and hands the engine what this project's jobs need beyond the container contract (and, in
:mod:`.tracking_store`, its MLflow store), and the deploy function (:mod:`.deploy_function`) that the Lambda step runs
in-process against the local registry and the local endpoint (:mod:`pipelines.serving`). Nothing here imports torch:
the scripts do, in their own processes.
"""
