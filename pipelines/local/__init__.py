"""The pipeline's definition executed on one machine: ``python -m pipelines.run local``.

The runner (:mod:`.runner`) builds the definition that ``upsert`` sends (same builder, same options) and the
executor (:mod:`.executor`) runs it from its JSON alone: one executor per step type (:mod:`.jobs`:
Processing, Training, Tuning under the SageMaker container contract of :mod:`.containers`, with the tuner's
sampling in :mod:`.tuning`; :mod:`.control`: Condition, Fail, RegisterModel, Lambda), expressions evaluated by
:mod:`.expressions`, S3 URIs mapped to the object store of :mod:`.objectstore`, steps cached by :mod:`.cache`.
The Lambda step runs the deploy function in-process against the local registry (:mod:`.registry`) and the
local endpoint (:mod:`.server`, :mod:`.endpoint`) through :mod:`.deploy_function`. :mod:`.cli` holds the
commands. Nothing here imports torch: the scripts do, in their own processes.
"""
