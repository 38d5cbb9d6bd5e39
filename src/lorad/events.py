"""Log and audit event names, in one place.

snake_case verbs in the past tense. Each is logged once, by the layer that owns it: the
pipeline logs what happens to a job, :mod:`lorad.release` what happens to the adapter that
serves, the registry audits its own pointer moves. The audit table (``Buffer.record_event``)
uses the same names.
"""

# Jobs (lorad.pipeline)
JOB_PREPARED = "job_prepared"
JOB_STATE_CHANGED = "job_state_changed"  # preparing, training, evaluating
JOB_PROMOTED = "job_promoted"
JOB_REJECTED = "job_rejected"
JOB_FAILED = "job_failed"
JOB_CANCELLED = "job_cancelled"
JOB_PAUSED = "job_paused"
JOB_SKIPPED = "job_skipped"
JOB_CRASHED = "job_crashed"
JOB_STATE_NOT_SAVED = "job_state_not_saved"
JOB_RECOVERY_SKIPPED = "job_recovery_skipped"
ORPHAN_WORKER_STOPPED = "orphan_worker_stopped"
STATUS_REFRESH_FAILED = "status_refresh_failed"

# Versions (lorad.pipeline, lorad.release, lorad.registry, lorad.publish)
CANDIDATE_REJECTED = "candidate_rejected"
ADAPTER_PROMOTED = "adapter_promoted"
ADAPTER_ROLLED_BACK = "adapter_rolled_back"
ADAPTER_CHANGE_REVERTED = "adapter_change_reverted"
ADAPTER_PUBLISHED = "adapter_published"
PUBLISH_FAILED = "publish_failed"
VERSIONS_PRUNED = "versions_pruned"

# The daemon's scheduling (lorad.daemon.service)
JOB_QUEUED = "job_queued"
JOB_STARTED = "job_started"
JOB_RESUMED = "job_resumed"
JOB_PAUSING = "job_pausing"
BACKOFF_STARTED = "backoff_started"
