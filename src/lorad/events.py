"""Log and audit event names, in one place.

snake_case verbs in the past tense. Each is logged once, by the layer that owns it: the
pipeline logs what happens to a job, :mod:`lorad.release` what happens to the adapter that
serves, the registry audits its own pointer moves. The audit table (``Buffer.record_event``)
uses the same names.
"""

# Jobs (lorad.cycle)
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

# Versions (lorad.cycle, lorad.release, lorad.release.registry, lorad.release.hooks)
CANDIDATE_REJECTED = "candidate_rejected"
ADAPTER_PROMOTED = "adapter_promoted"
ADAPTER_ROLLED_BACK = "adapter_rolled_back"
ADAPTER_CHANGE_REVERTED = "adapter_change_reverted"
ADAPTER_PUBLISHED = "adapter_published"
PUBLISH_FAILED = "publish_failed"
PUBLISH_CANCELLED = "publish_cancelled"  # hooks still waiting were cut short by a cancel
VERSIONS_PRUNED = "versions_pruned"
GGUF_EXPORTED = "gguf_exported"  # adapter.gguf + Modelfile written into a new version
GGUF_EXPORT_REFUSED = "gguf_export_refused"  # the version is made without them; its hooks say why
GGUF_MERGED = "gguf_merged"  # merged.gguf (the adapter merged into the base GGUF) written into a new version
GGUF_MERGE_REFUSED = "gguf_merge_refused"  # the version is made without merged.gguf; the ollama hook says why

# The daemon's scheduling (lorad.daemon.service)
JOB_QUEUED = "job_queued"
JOB_STARTED = "job_started"
JOB_RESUMED = "job_resumed"
JOB_PAUSING = "job_pausing"
BACKOFF_STARTED = "backoff_started"


# A vLLM server sharing the GPU (lorad.release.gpu_share)
SERVER_SLEPT = "server_slept"
SERVER_SLEEP_FAILED = "server_sleep_failed"
SERVER_WOKEN = "server_woken"
SERVER_WAKE_FAILED = "server_wake_failed"
WAKER_ROUND_FAILED = "waker_round_failed"  # lorad.daemon.waker: a round raised; the thread goes on

# Prometheus metrics (lorad.daemon.metrics)
METRICS_LISTENING = "metrics_listening"
METRICS_TEXTFILE_FAILED = "metrics_textfile_failed"
METRICS_SCRAPE_FAILED = "metrics_scrape_failed"

# lorad.buffer.store
CHECKPOINTER_UNAVAILABLE = "checkpointer_unavailable"
CHECKPOINTER_STOPPED = "checkpointer_stopped"
CHECKPOINT_FAILED = "checkpoint_failed"
BUFFER_SYNC_FAILED = "buffer_sync_failed"

# lorad.daemon.control
ALLOWED_GROUP_MISSING = "allowed_group_missing"
SOCKET_GROUP_NOT_SET = "socket_group_not_set"
CONTROL_CONNECTION_FAILED = "control_connection_failed"
CLIENT_REFUSED = "client_refused"
REQUEST_REFUSED = "request_refused"
REQUEST_TIMED_OUT = "request_timed_out"
REQUEST_FAILED = "request_failed"

# lorad.daemon.feedback
FEEDBACK_RECORDED = "feedback_recorded"
FEEDBACK_CONFLICT_REFUSED = "feedback_conflict_refused"

# lorad.daemon.service
DAEMON_START_FAILED = "daemon_start_failed"
DAEMON_STARTED = "daemon_started"
STORE_RECONCILED = "store_reconciled"
DAEMON_STOPPED = "daemon_stopped"
DAEMON_STOPPING = "daemon_stopping"
JOB_REAP_FAILED = "job_reap_failed"
SCHEDULE_STEP_FAILED = "schedule_step_failed"
SCHEDULE_WAITED = "schedule_waited"
CONTROL_CLIENT_LEFT = "control_client_left"  # a promote/rollback's client gave up; the change goes on
PUBLISH_INTERRUPTED = "publish_interrupted"  # the daemon stopped while hooks still waited on a server
CONFIG_RELOAD_REFUSED = "config_reload_refused"
CONFIG_RELOAD_PARTIAL = "config_reload_partial"
CONFIG_RELOADED = "config_reloaded"
EXAMPLES_REFRESH_FAILED = "examples_refresh_failed"
CONTROL_COMMAND_RECEIVED = "control_command_received"
SCHEDULING_PAUSED = "scheduling_paused"
SCHEDULING_RESUMED = "scheduling_resumed"

# lorad.daemon.views
EXAMPLE_COUNTS_FAILED = "example_counts_failed"

# lorad.daemon.watcher
SOURCE_NOT_WATCHED = "source_not_watched"
SOURCE_REWATCHED = "source_rewatched"
WATCH_EVENTS_LOST = "watch_events_lost"
INGEST_LOOP_FAILED = "ingest_loop_failed"

# lorad.sources.ingest
ARTIFACT_QUARANTINED = "artifact_quarantined"
INGEST_FAILED = "ingest_failed"
INGEST_COMPLETED = "ingest_completed"

# lorad.release.registry
REGISTRY_POINTER_REFUSED = "registry_pointer_refused"

# lorad.sources.pool
PARSE_WORKERS_UNAVAILABLE = "parse_workers_unavailable"
PARSE_WORKERS_STARTED = "parse_workers_started"
PARSE_WORKERS_FAILED = "parse_workers_failed"
