"""Parsing in worker processes: results in order, and a scan that survives its workers."""

from __future__ import annotations

import multiprocessing
import os

import pytest
from structlog.testing import capture_logs

from lorad.sources import pool


def _pid_and_double(x: int) -> tuple[int, int]:
    return os.getpid(), 2 * x


def _pid_and_niceness(x: int) -> tuple[int, int]:
    return os.getpid(), os.nice(0)


def _halve(x: int) -> float:
    return x / 2


def _die_in_a_worker(x: int) -> int:
    if multiprocessing.parent_process() is not None and x == 3:
        os._exit(7)  # as the OOM killer would end it: no exception, no goodbye
    return 2 * x


def test_without_workers_it_is_a_plain_map():
    results = list(pool.ordered_map(_pid_and_double, [1, 2, 3], 0, preload=__name__))
    assert results == [(os.getpid(), 2), (os.getpid(), 4), (os.getpid(), 6)]


def test_workers_return_every_result_in_order():
    chunks = list(range(40))
    results = list(pool.ordered_map(_pid_and_double, chunks, 2, preload=__name__))
    assert [r for _, r in results] == [2 * x for x in chunks]
    assert os.getpid() not in {pid for pid, _ in results}  # really done elsewhere


def test_the_head_is_done_here_while_the_workers_start():
    chunks = list(range(20))
    results = list(pool.ordered_map(_pid_and_double, chunks, 2, preload=__name__, head=5))
    assert [r for _, r in results] == [2 * x for x in chunks]
    assert {pid for pid, _ in results[:5]} == {os.getpid()}
    assert os.getpid() not in {pid for pid, _ in results[5:]}


def test_workers_run_below_the_writer_s_priority():
    results = list(pool.ordered_map(_pid_and_niceness, [1, 2, 3], 1, preload=__name__))
    assert {nice for _, nice in results} == {min(os.nice(0) + pool.WORKER_NICENESS, 19)}


def test_a_worker_that_dies_leaves_the_rest_to_this_process():
    chunks = list(range(12))
    with capture_logs() as logs:
        results = list(pool.ordered_map(_die_in_a_worker, chunks, 2, preload=__name__))
    assert results == [2 * x for x in chunks]
    assert [e["event"] for e in logs] == ["parse_workers_started", "parse_workers_failed"]


def test_a_pool_that_cannot_start_leaves_everything_to_this_process(monkeypatch):
    def no_semaphores(method):
        raise ImportError("This platform lacks a functioning sem_open implementation")

    monkeypatch.setattr(pool.multiprocessing, "get_context", no_semaphores)
    with capture_logs() as logs:
        results = list(pool.ordered_map(_pid_and_double, [1, 2, 3], 2, preload=__name__))
    assert results == [(os.getpid(), 2), (os.getpid(), 4), (os.getpid(), 6)]
    assert [e["event"] for e in logs] == ["parse_workers_unavailable"]


def test_an_error_of_the_function_itself_still_reaches_the_caller():
    with pytest.raises(TypeError):
        list(pool.ordered_map(_halve, [1, "x", 3], 2, preload=__name__))


def test_worker_count_is_two_unless_there_is_a_single_cpu(monkeypatch):
    monkeypatch.setattr(pool.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert pool.worker_count(0) == 2  # the writer is the limit: more would only wait
    assert pool.worker_count(5) == 5
    monkeypatch.setattr(pool.os, "sched_getaffinity", lambda pid: {0, 1})
    assert pool.worker_count(0) == 2  # niced: they take what the writer leaves
    monkeypatch.setattr(pool.os, "sched_getaffinity", lambda pid: {0})
    assert pool.worker_count(0) == 0  # a single CPU: parse where the scan runs
