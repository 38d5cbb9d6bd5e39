"""When to train: windows, triggers, GPU-busy check and failure back-off.

Everything here takes ``now`` as a parameter (an aware datetime) and is a pure function of
its arguments, except :func:`gpu_busy`, the thin NVML wrapper. Whether a window is open and
when the next one opens are both read from one place, :meth:`Schedule.bounds` (a window's
start and end as instants), and compared as instants, never as wall times: around a
daylight-saving change the two used to disagree (a window in the skipped hour was reported
by next_window, from an APScheduler cron trigger, and never opened).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo

from lorad.config import WEEKDAYS


@dataclass(frozen=True)
class Window:
    """One daily window, in minutes after midnight; it crosses midnight when end <= start."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> Window:
        a, b = text.split("-")
        (h1, m1), (h2, m2) = (map(int, a.split(":")), map(int, b.split(":")))
        return cls(h1 * 60 + m1, h2 * 60 + m2)

    @property
    def length(self) -> timedelta:
        return timedelta(minutes=(self.end - self.start) % 1440 or 1440)

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


def zone(name: str) -> tzinfo:
    """The tzinfo of ``schedule.timezone`` ("local" = the host's zone, DST-aware)."""
    if name == "local":
        import tzlocal

        return tzlocal.get_localzone()
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


class Schedule:
    """The training windows of ``[schedule]``.

    Args:
        windows: "HH:MM-HH:MM" strings in the local time of ``timezone``.
        timezone: "local" or an IANA name.
        weekdays: days a window may *start* on ("mon".."sun"); empty = every day.
    """

    def __init__(self, windows: tuple[str, ...], timezone: str = "local", weekdays: tuple[str, ...] = ()):
        self.windows = tuple(Window.parse(w) for w in windows)
        self.tz = zone(timezone)
        self.weekdays = tuple(weekdays)

    def _allowed(self, day: date) -> bool:
        return not self.weekdays or WEEKDAYS[day.weekday()] in self.weekdays

    def bounds(self, window: Window, day: date) -> tuple[datetime, datetime]:
        """(start, end) of ``window`` opening on ``day``: instants at the zone's offset of the
        moment (a fixed offset, so that they compare as instants with any other datetime).

        Wall times are read as the zone reads them: one the clock skips (a DST gap) is the
        instant it names on the offset before the change, the gap's length later on the
        clock, and the window moves whole with its start (02:15-02:45 on a night that jumps
        from 02:00 to 03:00 is 03:15-03:45); one the clock passes twice is its first passing.
        """
        wall = datetime(day.year, day.month, day.day, window.start // 60, window.start % 60, tzinfo=self.tz)
        start = wall.astimezone(timezone.utc)
        if start.astimezone(self.tz).replace(tzinfo=None) != wall.replace(tzinfo=None):  # in a gap
            end = start + window.length
        else:
            end = (wall + window.length).astimezone(timezone.utc)  # on the clock: 02:00-06:00 ends at 06:00
        return self._at_offset(start), self._at_offset(end)

    def _at_offset(self, instant: datetime) -> datetime:
        local = instant.astimezone(self.tz)
        offset, name = local.utcoffset(), local.tzname()
        if offset is None or name is None:  # never: astimezone gives an aware datetime
            return local
        return local.replace(tzinfo=timezone(offset, name))

    def open_window(self, now: datetime) -> tuple[datetime, datetime] | None:
        """(start, end) of the window open at ``now``, or None when none is."""
        day = now.astimezone(self.tz).date()
        best = None
        for w in self.windows:
            for back in (0, 1):  # today's window, or yesterday's crossing midnight
                opens = day - timedelta(days=back)
                start, end = self.bounds(w, opens)
                is_open = _utc(start) <= _utc(now) < _utc(end) and self._allowed(opens)
                if is_open and (best is None or _utc(end) > _utc(best[1])):
                    best = (start, end)
        return best

    def next_window(self, now: datetime) -> tuple[datetime, datetime] | None:
        """The window open now, else the next one to open (None if there are no windows)."""
        current = self.open_window(now)
        if current:
            return current
        day = now.astimezone(self.tz).date()
        starts = [
            self.bounds(w, day + timedelta(days=ahead))
            for w in self.windows
            for ahead in range(8)
            if self._allowed(day + timedelta(days=ahead))
        ]
        later = [b for b in starts if _utc(b[0]) > _utc(now)]
        return min(later, key=lambda b: _utc(b[0])) if later else None


def _utc(t: datetime) -> datetime:
    # Why: aware datetimes that share a tzinfo compare as wall times (fold ignored); in UTC the
    # two passes of a repeated hour are told apart.
    return t.astimezone(timezone.utc)


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after ``failures`` consecutive failed jobs: initial, 2x, 4x ... up to maximum."""
    if failures <= 0:
        return 0.0
    return min(initial * 2 ** min(failures - 1, 60), maximum)


@dataclass(frozen=True)
class Decision:
    """What the scheduler wants the daemon to do now."""

    action: str  # "start", "resume", "pause", "wait"
    reason: str
    job_id: str | None = None


def decide(
    *,
    window_open: bool,
    running: dict | None,
    queued: list[dict],
    paused: list[dict],
    scheduling_paused: bool,
    new_examples: int,
    min_new_examples: int,
    gpu_busy: bool | None,
    now_ts: float,
    backoff_until: float,
) -> Decision:
    """The scheduler's choice at one instant, from plain values.

    Args:
        window_open: a training window is open now.
        running: the job in progress (with "trigger": "window" | "manual"), or None.
        queued: jobs waiting to start, oldest first; a "manual" one ignores the window.
        paused: jobs paused at a window end or shutdown, oldest first.
        scheduling_paused: ``lorad pause`` is in effect (manual jobs still run).
        new_examples: training examples no version has been trained on yet (since the newest
            version's snapshot, promoted or not: a rejected candidate is not simply retried).
        gpu_busy: the GPU is busy serving (None = not checked or not measurable).
        now_ts, backoff_until: epoch seconds; no window job starts before backoff_until.
    """
    if running is not None:
        if running.get("trigger") != "manual" and (not window_open or scheduling_paused):
            why = "training window closed" if not window_open else "scheduled training paused"
            return Decision("pause", why, running["job_id"])
        return Decision("wait", "a job is running", running["job_id"])
    if gpu_busy:
        return Decision("wait", "GPU busy serving")
    manual = [j for j in queued if j.get("trigger") == "manual"]
    if manual:
        return Decision("start", "requested with train-now", manual[0]["job_id"])
    manual_paused = [j for j in paused if j.get("trigger") == "manual"]
    if manual_paused:
        return Decision("resume", "requested with train-now", manual_paused[0]["job_id"])
    if scheduling_paused:
        return Decision("wait", "scheduled training paused")
    if not window_open:
        return Decision("wait", "outside the training windows")
    if paused:
        return Decision("resume", "window open", paused[0]["job_id"])
    if queued:
        return Decision("start", "window open", queued[0]["job_id"])
    if now_ts < backoff_until:
        return Decision("wait", f"backing off after a failure for {backoff_until - now_ts:.0f} s")
    if new_examples < min_new_examples:
        return Decision("wait", f"waiting for {min_new_examples} examples not yet trained on ({new_examples} so far)")
    return Decision("start", f"window open and {new_examples} examples not yet trained on")


def gpu_busy(threshold_percent: int) -> bool | None:
    """True when any NVIDIA GPU's utilisation is above the threshold; None without NVML or check."""
    if threshold_percent <= 0:
        return None
    try:
        import pynvml  # nvidia-ml-py; optional
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            return any(
                pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByIndex(i)).gpu > threshold_percent
                for i in range(count)
            )
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no device: nothing to protect
        return None
