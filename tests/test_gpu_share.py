"""vLLM sleep/wake around the training worker, against a small HTTP server in the test that
speaks vLLM's sleep endpoints (/sleep, /wake_up, /is_sleeping) and its runtime LoRA ones."""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from lorad import config, events
from lorad.buffer.job_table import JobStore
from lorad.release import gpu_share
from lorad.release.gpu_share import GpuShare, ShareError, SleepingServer
from sleepy_vllm import SleepyVllm
from test_cycle import settings_for


@pytest.fixture
def store(buffer):
    return JobStore(buffer.conn)


def server(fake: SleepyVllm, retries: int = 3) -> SleepingServer:
    waits: list[float] = []
    return SleepingServer(fake.url, timeout=5, retries=retries, backoff=0.5, sleep=waits.append)


def test_the_server_sleeps_while_the_body_runs_and_wakes_after_it(store):
    with SleepyVllm() as fake:
        share = GpuShare([server(fake)], store)
        with share.asleep("job-1"):
            assert fake.sleeping
            [record] = gpu_share.records(store)
            assert record["state"] == "asleep" and record["job_id"] == "job-1" and record["url"] == fake.url
        assert not fake.sleeping
        assert gpu_share.records(store) == []
        assert fake.calls() == ["POST /sleep?level=1", "GET /is_sleeping", "POST /wake_up", "GET /is_sleeping"]


def test_the_server_is_woken_when_the_body_raises(store):
    with SleepyVllm() as fake:
        with pytest.raises(RuntimeError), GpuShare([server(fake)], store).asleep("job-1"):
            raise RuntimeError("the worker could not start")
        assert not fake.sleeping and gpu_share.records(store) == []


def test_a_wake_that_fails_is_retried_until_it_succeeds(store):
    with SleepyVllm(wake_failures=2) as fake:
        s = server(fake, retries=3)
        with capture_logs() as logs, GpuShare([s], store).asleep("job-1"):
            pass
        assert not fake.sleeping and gpu_share.records(store) == []
        assert fake.calls().count("POST /wake_up") == 3
        assert [e["event"] for e in logs] == [events.SERVER_SLEPT, events.SERVER_WOKEN]


def test_a_wake_that_never_succeeds_is_logged_audited_recorded_and_retried_later(buffer, store):
    with SleepyVllm(wake_failures=-1) as fake:
        with capture_logs() as logs, GpuShare([server(fake, retries=2)], store, buffer.record_event).asleep("job-1"):
            pass
        assert fake.sleeping and fake.calls().count("POST /wake_up") == 3
        [failed] = [e for e in logs if e["event"] == events.SERVER_WAKE_FAILED]
        assert failed["log_level"] == "error" and failed["url"] == fake.url and "HTTP 503" in failed["error"]
        [audit] = buffer.events(events.SERVER_WAKE_FAILED)
        assert audit["job_id"] == "job-1" and audit["detail"]["url"] == fake.url
        [record] = gpu_share.records(store)
        assert record["state"] == "wake_failed" and "after 3 attempts" in record["error"]
        states = gpu_share.server_states([], gpu_share.records(store))
        assert states == [
            {
                "url": fake.url,
                "state": "wake_failed",
                "since": record["since"],
                "job_id": "job-1",
                "error": record["error"],
            }
        ]

        # Later (the daemon's waker, or the next cycle): the server answers again, and is woken
        # from the record alone, with the settings the record kept.
        fake.wake_failures = 0
        assert GpuShare([], store).wake_recorded() == []
        assert not fake.sleeping and gpu_share.records(store) == []


@pytest.mark.parametrize(
    "path,how",
    [
        ("/wake_up", "cut"),
        ("/is_sleeping", "cut"),
        ("/is_sleeping", "nested"),
        ("/is_sleeping", "list"),
        ("/is_sleeping", "garbage"),
    ],
)
def test_a_broken_reply_to_the_wake_is_a_recorded_wake_failure_never_an_exception(buffer, store, path, how):
    """A reply cut mid-body (IncompleteRead), nested past the JSON parser, not an object or not
    JSON: the body still ends normally, and the wake failure is recorded, logged and audited."""
    with SleepyVllm() as fake, capture_logs() as logs:
        share = GpuShare([server(fake, retries=1)], store, buffer.record_event)
        with share.asleep("job-1"):
            fake.broken = {path: how}  # while the worker runs
    [failed] = [e for e in logs if e["event"] == events.SERVER_WAKE_FAILED]
    assert failed["log_level"] == "error" and "after 2 attempts" in failed["error"]
    [record] = gpu_share.records(store)
    assert record["state"] == "wake_failed" and record["job_id"] == "job-1" and record["error"]
    assert buffer.events(events.SERVER_WAKE_FAILED)[0]["detail"]["url"] == fake.url


def test_a_broken_reply_to_the_sleep_fails_the_sleep_with_a_reason(store):
    with SleepyVllm(broken={"/is_sleeping": "nested"}) as fake:
        share = GpuShare([server(fake, retries=0)], store)
        with pytest.raises(ShareError, match="is_sleeping"), share.asleep("job-1"):
            pass


def test_a_server_that_will_not_sleep_stops_the_worker_from_starting(store):
    with SleepyVllm(sleep_mode=False) as fake:
        ran = []
        with pytest.raises(ShareError, match="VLLM_SERVER_DEV_MODE=1"), GpuShare([server(fake)], store).asleep("job-1"):
            ran.append(True)
        assert ran == []
        assert gpu_share.records(store) == []  # no sleep endpoints: it cannot be asleep


def test_an_unreachable_server_fails_the_sleep_and_stays_recorded_until_it_is_woken(store):
    with SleepyVllm() as fake:
        url = fake.url
    gone = SleepingServer(url, timeout=1, retries=1, backoff=0, sleep=lambda s: None)
    with pytest.raises(ShareError, match="after 2 attempts"), GpuShare([gone], store).asleep("job-1"):
        pass
    # It may have gone to sleep before it stopped answering: the record stays for the waker.
    [record] = gpu_share.records(store)
    assert record["state"] == "wake_failed" and record["url"] == url


def test_sleep_during_training_is_only_for_vllm_hooks():
    with pytest.raises(config.ConfigError, match=r'publish\[0\].sleep_during_training: only a kind = "vllm"'):
        config.loads("[[publish]]\nargv = ['x']\nsleep_during_training = true\n")
    s = config.loads(
        "[[publish]]\nkind = 'vllm'\nurl = 'http://127.0.0.1:8000'\nsleep_during_training = true\n"
        "[[publish]]\nkind = 'vllm'\nurl = 'http://127.0.0.1:8001'\n"
    )
    assert [x.url for x in gpu_share.servers_from_settings(s.publish)] == ["http://127.0.0.1:8000"]


# -- around a real worker (tiny model) ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the worker's torch: one core of the shared CPU
        mp.setenv(k, "1")
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    from lorad.training.tiny import build_tiny_model

    yield build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, vocab_size=512)
    mp.undo()


def cycle_settings(root, base_model, url: str, steps: int = 8) -> config.Settings:
    """test_cycle's settings (no guard), promoting on any held-out loss drop, with a vLLM server
    that sleeps while the worker trains."""
    return settings_for(
        root,
        str(base_model),
        steps=steps,
        guard=False,
        evaluation=f"""min_improvement = 0.0
[[publish]]
kind = "vllm"
url = "{url}"
retries = 1
backoff = 0.0
timeout = 10.0
sleep_during_training = true
""",
    )


def _progress_times(job_dir) -> list[float]:
    return [json.loads(line)["ts"] for line in (job_dir / "progress.jsonl").read_text().splitlines() if line.strip()]


def test_a_promoted_cycle_trains_while_the_server_sleeps_and_loads_the_adapter_after_the_wake(tmp_path, tiny_model):
    from lorad import cycle

    with SleepyVllm() as fake:
        outcome = cycle.run_now(cycle_settings(tmp_path, tiny_model, fake.url))
        assert outcome.status == "promoted", outcome.reason
        assert fake.calls() == [
            "POST /sleep?level=1",
            "GET /is_sleeping",
            "POST /wake_up",
            "GET /is_sleeping",
            "POST /v1/load_lora_adapter",
        ]
        assert list(fake.loaded) == [f"lorad-{outcome.version}"]
        slept, woke = fake.log[0][0], fake.log[2][0]
        times = _progress_times(cycle.job_dir_of(cycle_settings(tmp_path, tiny_model, fake.url), outcome.job_id))
        assert times and all(slept <= t <= woke for t in times)  # every step the worker took, asleep


def test_a_failed_worker_a_paused_one_and_a_cancelled_one_leave_the_server_awake(tmp_path, tiny_model):
    import shutil

    from lorad import cycle
    from lorad.buffer.store import Buffer

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text("{not json")
    with SleepyVllm() as fake:
        failed = cycle.run_now(cycle_settings(tmp_path / "a", broken, fake.url))
        assert failed.status == "failed"
        assert fake.calls() == ["POST /sleep?level=1", "GET /is_sleeping", "POST /wake_up", "GET /is_sleeping"]
        assert not fake.sleeping

        s = cycle_settings(tmp_path / "b", tiny_model, fake.url, steps=500)
        with Buffer(s.buffer_path) as buffer:
            from lorad.sources import open_sources
            from lorad.sources.ingest import ingest

            ingest(buffer, open_sources(s.store), s.buffer.batch_size)
            job_id = JobStore(buffer.conn).create("manual")["job_id"]
        for how, final in (("pause", "paused"), ("cancel", "cancelled")):  # the paused job resumes, then cancels
            stop = cycle.StopRequest()

            def on_progress(record, stop=stop, how=how):
                if record.get("stage") == "training" and fake.sleeping:
                    getattr(stop, how)(f"{how} by the test")

            fake.log.clear()
            outcome = cycle.run(s, job_id, holder="the test", stop=stop, on_progress=on_progress)
            assert outcome.status == final, outcome.reason
            assert fake.calls() == ["POST /sleep?level=1", "GET /is_sleeping", "POST /wake_up", "GET /is_sleeping"]
            assert not fake.sleeping
        with Buffer(s.buffer_path) as buffer:
            assert gpu_share.records(JobStore(buffer.conn)) == []


def test_a_cycle_first_wakes_a_server_a_dead_cycle_left_asleep(tmp_path, tiny_model):
    """A `lorad train` killed while its worker trained left the record; the next cycle acts on it
    before anything else (here one that then finds nothing to train on)."""
    from lorad import cycle
    from lorad.buffer.store import Buffer

    with SleepyVllm(sleeping=True, wake_failures=1) as fake:
        s = cycle_settings(tmp_path, tiny_model, fake.url)
        s.state_dir.mkdir(parents=True)
        with Buffer(s.buffer_path) as buffer:
            store = JobStore(buffer.conn)
            GpuShare([], store)._record(SleepingServer(fake.url, retries=1, backoff=0.0), "asleep", "job-killed")
            job_id = store.create("manual")["job_id"]
        outcome = cycle.run(s, job_id, holder="the test")
        assert outcome.status == "skipped", outcome.reason
        # its first try refused, the retry taken
        assert fake.calls() == ["POST /wake_up", "POST /wake_up", "GET /is_sleeping"] and not fake.sleeping
        with Buffer(s.buffer_path) as buffer:
            assert gpu_share.records(JobStore(buffer.conn)) == []


def test_a_wake_cut_short_after_the_worker_succeeded_never_costs_the_trained_adapter(tmp_path, tiny_model):
    """The worker trains, then POST /wake_up closes mid-reply: the job is concluded from its result
    (a version, the gate's verdict), the wake failure is recorded for the waker to retry, and the
    next cycle is not failed by it either."""
    from lorad import cycle
    from lorad.buffer.store import Buffer

    with SleepyVllm(broken={"/wake_up": "cut"}) as fake:
        s = cycle_settings(tmp_path, tiny_model, fake.url)
        outcome = cycle.run_now(s)
        assert outcome.status in ("promoted", "rejected"), outcome.reason
        assert outcome.version and outcome.verdict is not None
        with Buffer(s.buffer_path) as buffer:
            [record] = gpu_share.records(JobStore(buffer.conn))
            assert record["state"] == "wake_failed" and record["job_id"] == outcome.job_id
            assert "cut short" in record["error"]
            assert buffer.events(events.SERVER_WAKE_FAILED)[0]["job_id"] == outcome.job_id
        fake.broken.clear()  # the server answers again: the next cycle wakes it first
        again = cycle.run_now(s)
        assert again.status != "failed", again.reason
        assert not fake.sleeping
