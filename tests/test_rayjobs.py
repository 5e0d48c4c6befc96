"""Following a job's log: Ray streams it in chunks; `Jobs.wait` hands on whole lines. (The real
stream, from a real head, is exercised in tests/integration/test_stack.py.)"""

from __future__ import annotations

import asyncio

import pytest

from atelier.errors import NotFound, ServiceError
from atelier.rayjobs import Jobs
from atelier.settings import Settings


class Job:
    """What Ray's JobSubmissionClient would say about one job."""

    def __init__(self, chunks: list[str], status: str = "SUCCEEDED", delay_s: float = 0.0):
        self.chunks = chunks
        self.state = status
        self.delay_s = delay_s

    def get_job_status(self, job_id):
        if job_id != "job-1":
            raise RuntimeError("no such job")
        return type("Status", (), {"value": self.state})()

    async def tail_job_logs(self, job_id):
        if job_id != "job-1":
            raise RuntimeError(f"Job '{job_id}' does not exist.")
        for chunk in self.chunks:
            await asyncio.sleep(self.delay_s)
            yield chunk


def jobs_for(job: Job) -> Jobs:
    jobs = Jobs(Settings())
    jobs._client = job
    return jobs


def test_lines_cut_across_chunks_come_out_whole_and_in_order():
    lines: list[str] = []
    job = Job(["first\nsec", "ond\r\n", "", "third\nlast without newline"])
    assert jobs_for(job).wait("job-1", on_line=lines.append) == "SUCCEEDED"
    assert lines == ["first", "second", "third", "last without newline"]


def test_without_a_callback_it_just_waits_for_the_end():
    assert jobs_for(Job(["x\n"], status="FAILED")).wait("job-1") == "FAILED"


def test_an_unknown_job_is_not_found():
    with pytest.raises(NotFound):
        jobs_for(Job([])).wait("job-2", on_line=print)


def test_a_job_that_outlives_the_timeout_is_a_service_error():
    job = Job(["a\n"] * 100, status="RUNNING", delay_s=0.05)
    with pytest.raises(ServiceError, match="job still RUNNING after 0.2 s"):
        jobs_for(job).wait("job-1", timeout_s=0.2)
