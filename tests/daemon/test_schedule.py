"""Training windows, the scheduler's decision and back-off, at fixed times (no sleeping)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from lorad.daemon.schedule import Schedule, backoff_delay, decide

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def at(*args, tz=UTC):
    return datetime(*args, tzinfo=tz)


def test_window_is_open_inside_and_closed_outside():
    s = Schedule(("02:00-06:00",), "UTC")
    assert s.open_window(at(2026, 11, 23, 1, 59)) is None
    assert s.open_window(at(2026, 11, 23, 2, 0)) == (at(2026, 11, 23, 2, 0), at(2026, 11, 23, 6, 0))
    assert s.open_window(at(2026, 11, 23, 5, 59, 59)) is not None
    assert s.open_window(at(2026, 11, 23, 6, 0)) is None  # the end is exclusive


def test_window_crossing_midnight_belongs_to_the_day_it_starts():
    s = Schedule(("22:00-02:00",), "UTC", ("mon",))  # 2026-11-23 is a Monday
    assert s.open_window(at(2026, 11, 23, 23, 0))[0] == at(2026, 11, 23, 22, 0)
    assert s.open_window(at(2026, 11, 24, 1, 30))[1] == at(2026, 11, 24, 2, 0)  # Tuesday morning, Monday's window
    assert s.open_window(at(2026, 11, 24, 23, 0)) is None  # Tuesday evening: no window starts on Tuesday


def test_windows_follow_the_configured_timezone():
    s = Schedule(("02:00-06:00",), "Europe/Berlin")
    assert s.open_window(at(2026, 11, 23, 1, 30)) is not None  # 02:30 in Berlin (UTC+1 in November)
    assert s.open_window(at(2026, 11, 23, 5, 30)) is None  # 06:30 in Berlin
    summer = s.open_window(at(2026, 7, 1, 0, 30))  # 02:30 CEST (UTC+2)
    assert summer[0].astimezone(UTC) == at(2026, 7, 1, 0, 0)


def test_next_window_skips_days_not_listed():
    s = Schedule(("02:00-06:00",), "UTC", ("sat", "sun"))
    start, end = s.next_window(at(2026, 11, 23, 12, 0))  # Monday noon -> Saturday 02:00
    assert start == at(2026, 11, 28, 2, 0) and end == at(2026, 11, 28, 6, 0)


def test_next_window_is_the_open_one_while_inside_it():
    s = Schedule(("02:00-06:00", "13:00-14:00"), "UTC")
    assert s.next_window(at(2026, 11, 23, 13, 30))[0] == at(2026, 11, 23, 13, 0)
    assert s.next_window(at(2026, 11, 23, 14, 30))[0] == at(2026, 11, 24, 2, 0)


def test_whole_day_window_is_always_open():
    s = Schedule(("00:00-24:00",), "UTC")
    for hour in (0, 7, 23):
        assert s.open_window(at(2026, 11, 23, hour, 59)) is not None


def test_backoff_doubles_up_to_the_maximum():
    assert [backoff_delay(n, 60, 3600) for n in range(0, 8)] == [0, 60, 120, 240, 480, 960, 1920, 3600]
    assert backoff_delay(500, 60, 3600) == 3600


def base(**kw):
    args = dict(
        window_open=True,
        running=None,
        queued=[],
        paused=[],
        scheduling_paused=False,
        new_examples=50,
        min_new_examples=20,
        gpu_busy=None,
        now_ts=1000.0,
        backoff_until=0.0,
    )
    return args | kw


def test_starts_a_window_job_when_enough_new_examples_arrived():
    assert decide(**base()).action == "start"
    d = decide(**base(new_examples=19))
    assert d.action == "wait" and "not yet trained on (19 so far)" in d.reason


def test_never_starts_outside_the_window_but_train_now_ignores_it():
    assert decide(**base(window_open=False)).action == "wait"
    d = decide(**base(window_open=False, queued=[{"job_id": "j1", "trigger": "manual"}]))
    assert (d.action, d.job_id) == ("start", "j1")


def test_pauses_a_window_job_at_the_end_of_the_window_but_not_a_manual_one():
    d = decide(**base(window_open=False, running={"job_id": "j1", "trigger": "window"}))
    assert (d.action, d.job_id, d.reason) == ("pause", "j1", "training window closed")
    assert decide(**base(window_open=False, running={"job_id": "j2", "trigger": "manual"})).action == "wait"


def test_one_job_at_a_time():
    d = decide(**base(running={"job_id": "j1", "trigger": "window"}, queued=[{"job_id": "j2", "trigger": "manual"}]))
    assert d.action == "wait"


def test_resumes_a_paused_job_when_the_next_window_opens():
    paused = [{"job_id": "p1", "trigger": "window"}]
    assert decide(**base(window_open=False, paused=paused)).action == "wait"
    d = decide(**base(paused=paused, new_examples=0))
    assert (d.action, d.job_id) == ("resume", "p1")


def test_backoff_after_failure_delays_window_jobs_only():
    d = decide(**base(now_ts=1000.0, backoff_until=1300.0))
    assert d.action == "wait" and "backing off" in d.reason
    assert decide(**base(now_ts=1301.0, backoff_until=1300.0)).action == "start"
    manual = [{"job_id": "m", "trigger": "manual"}]
    assert decide(**base(backoff_until=5000.0, queued=manual)).action == "start"


def test_busy_gpu_blocks_every_start():
    assert decide(**base(gpu_busy=True)).action == "wait"
    assert decide(**base(gpu_busy=True, queued=[{"job_id": "m", "trigger": "manual"}])).action == "wait"
    assert decide(**base(gpu_busy=False)).action == "start"


def test_lorad_pause_stops_scheduled_training_but_not_manual_jobs():
    d = decide(**base(scheduling_paused=True, running={"job_id": "w", "trigger": "window"}))
    assert (d.action, d.reason) == ("pause", "scheduled training paused")
    assert decide(**base(scheduling_paused=True)).action == "wait"
    assert decide(**base(scheduling_paused=True, queued=[{"job_id": "m", "trigger": "manual"}])).action == "start"


def test_a_window_in_a_dst_gap_opens_when_next_window_says_it_does():
    """Berlin skips 02:00-03:00 on 29 March 2026: a 02:15-02:45 window never opened there while
    next_window reported it (issue 23). It opens 03:15-03:45 CEST, shifted by the gap, its length kept."""
    s = Schedule(("02:15-02:45",), "Europe/Berlin")
    start, end = s.next_window(at(2026, 3, 28, 23, 0))  # midnight in Berlin
    assert (start, end) == (at(2026, 3, 29, 1, 15), at(2026, 3, 29, 1, 45))  # 03:15-03:45 CEST
    assert s.open_window(at(2026, 3, 29, 1, 14, 59)) is None
    assert s.open_window(at(2026, 3, 29, 1, 15)) == (start, end)
    assert s.open_window(at(2026, 3, 29, 1, 44, 59)) == (start, end)
    assert s.open_window(at(2026, 3, 29, 1, 45)) is None
    # A window that ends where the gap does moves whole too, rather than shrinking to nothing.
    s = Schedule(("02:30-03:00",), "America/New_York")  # New York skips 02:00-03:00 on 8 March 2026
    start, end = s.next_window(at(2026, 3, 8, 5, 0))
    assert (start, end) == (at(2026, 3, 8, 7, 30), at(2026, 3, 8, 8, 0))  # 03:30-04:00 EDT
    assert s.open_window(at(2026, 3, 8, 7, 45)) == (start, end)


def test_a_window_the_clock_goes_back_through_opens_once():
    """Berlin's clocks go from 03:00 CEST back to 02:00 CET on 25 October 2026: a 01:30-02:30
    window is open for its hour once, not again when the clock reads 02:00 a second time (with
    an end already past, the job it started would pause at its first step)."""
    s = Schedule(("01:30-02:30",), "Europe/Berlin")
    first = (at(2026, 10, 24, 23, 30), at(2026, 10, 25, 0, 30))  # 01:30-02:30 CEST
    assert s.next_window(at(2026, 10, 24, 22, 0)) == first
    assert s.open_window(at(2026, 10, 25, 0, 15)) == first
    assert s.open_window(at(2026, 10, 25, 1, 15)) is None  # 02:15 CET, the second time round
    assert s.next_window(at(2026, 10, 25, 1, 15))[0] == at(2026, 10, 26, 0, 30)  # 01:30 CET the next night


def test_every_window_next_window_reports_opens_at_its_start_through_a_year_of_dst_changes():
    for zone, windows in (
        ("Europe/Berlin", ("02:15-02:45", "01:30-02:30", "22:00-03:00", "00:00-24:00")),
        ("America/New_York", ("02:30-03:00", "01:00-01:30", "02:00-06:00")),
        ("Australia/Lord_Howe", ("02:00-02:20", "01:45-02:15")),
    ):  # a half-hour change
        for text in windows:
            s = Schedule((text,), zone)
            now = at(2026, 1, 1, 0, 7)
            for _ in range(400):  # the daemon asks with UTC instants, as here
                start, end = (t.astimezone(UTC) for t in s.next_window(now))
                assert end > start, (zone, text, start, end)
                if start > now:
                    assert s.open_window(start - timedelta(seconds=1)) != (start, end), (zone, text, start)
                assert s.open_window(start) == (start, end), (zone, text, start, end)
                assert s.open_window(end - timedelta(seconds=1)) == (start, end), (zone, text, start, end)
                now = end + timedelta(hours=1)
