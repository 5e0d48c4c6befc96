"""The embedded stack for real: `up`, `down`, `status` with SeaweedFS and Ray on free ports, and
what guards them (S3 keys, the Ray token)."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import requests
from botocore import UNSIGNED
from botocore.exceptions import ClientError

from atelier import rayauth, stack
from atelier.errors import PortInUse, ServiceError
from atelier.s3 import boto3_client as s3_client
from atelier.settings import Settings, StackSettings
from atelier.stack import _process
from atelier.stack.ray_head import default_temp_dir
from atelier.stack.seaweedfs import READY_PROBE_KEY

pytestmark = pytest.mark.integration


def make_settings(home: Path, ports: dict[str, int]) -> Settings:
    return Settings(home=home, stack=StackSettings(**ports, num_cpus=1, start_timeout_s=90))


@pytest.fixture(scope="module")
def stack_settings(tmp_path_factory, free_stack_ports):
    """Settings of the module's stack: a temporary home and free ports."""
    home = tmp_path_factory.mktemp("home")
    yield make_settings(home, free_stack_ports())
    shutil.rmtree(default_temp_dir(home), ignore_errors=True)


@pytest.fixture(scope="module")
def started(stack_settings):
    """The stack, started once for the module; the StackStatus `up` returned."""
    t0 = time.monotonic()
    result = stack.up(stack_settings)
    print(f"up took {time.monotonic() - t0:.1f} s")
    try:
        yield result
    finally:
        t0 = time.monotonic()
        stack.down(stack_settings)
        print(f"down took {time.monotonic() - t0:.1f} s")
    assert not _leftovers(stack_settings), "down left processes behind"


def _client(settings: Settings, access: str | None = None, secret: str | None = None, **config):
    keys = stack.s3_credentials(settings)
    return s3_client(settings.s3_endpoint, access or keys[0], secret or keys[1], **config)


def _get(url: str, headers: dict[str, str] | None = None) -> dict:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def _ours(settings: Settings) -> list[psutil.Process]:
    """Every live process of the stack of `settings`, found through the records `up` wrote."""
    found = []
    for service in ("seaweedfs", "ray"):
        record = _process.read_record(settings.stack_dir / service / "pid.json")
        if record is not None:
            found += _process.members(record)
    return found


def _leftovers(settings: Settings) -> list[str]:
    """Live processes whose command line names this stack's folders: none may survive `down`."""
    needles = (str(settings.home), str(default_temp_dir(settings.home)))
    left = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(n in cmdline for n in needles):
            left.append(f"{proc.info['pid']} {cmdline[:120]}")
    return left


def test_up_starts_seaweedfs_and_ray(started, stack_settings):
    assert started.running
    for service in started.services:
        assert psutil.pid_exists(service.pid)
        assert service.detail.startswith("started in")
    names = [b["Name"] for b in _client(stack_settings).list_buckets()["Buckets"]]
    assert stack_settings.s3.bucket in names
    version = _get(f"{stack_settings.ray_dashboard}/api/version", rayauth.headers(stack_settings))
    assert version["ray_version"].startswith("2.")
    assert started.service("ray").endpoint == stack_settings.ray_dashboard
    assert started.service("seaweedfs").endpoint == stack_settings.s3_endpoint


def test_second_up_is_idempotent_and_says_already_running(started, stack_settings):
    again = stack.up(stack_settings)
    assert [s.detail for s in again.services] == ["already running", "already running"]
    assert [s.pid for s in again.services] == [s.pid for s in started.services]


def test_status_shows_both_running(started, stack_settings):
    result = stack.status(stack_settings)
    assert [(s.name, s.running) for s in result.services] == [("seaweedfs", True), ("ray", True)]
    assert result.service("ray").ports["gcs"] == stack_settings.stack.ray_port
    assert result.service("seaweedfs").ports["s3"] == stack_settings.stack.s3_port


def test_jobs_wait_follows_the_log_as_the_job_prints_it(started, stack_settings):
    from atelier.rayjobs import Jobs

    jobs = Jobs(stack_settings)
    script = ("import time; print('one', flush=True); time.sleep(5); print('x' * 30000); "
              "print('two')")
    job_id = jobs.submit(f'python -c "{script}"')
    lines: list[str] = []
    status_when_one_arrived: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if line == "one":
            status_when_one_arrived.append(jobs.status(job_id))

    assert jobs.wait(job_id, on_line=on_line, timeout_s=120) == "SUCCEEDED"
    assert lines[-3:] == ["one", "x" * 30000, "two"]  # a long line arrives whole
    # "one" was handed on while the job still ran (it sleeps 5 s after printing it), not read
    # from the finished log.
    assert status_when_one_arrived == ["RUNNING"]
    assert jobs.wait(job_id, timeout_s=30) == "SUCCEEDED"  # a finished job: the whole log again


def test_credentials_file_is_private_and_in_aws_format(started, stack_settings):
    path = stack_settings.embedded_credentials_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    parser = configparser.ConfigParser()
    parser.read(path)
    keys = (parser["default"]["aws_access_key_id"], parser["default"]["aws_secret_access_key"])
    assert keys == stack.s3_credentials(stack_settings)
    assert len(keys[1]) >= 32


def test_s3_rejects_wrong_unknown_and_missing_credentials(started, stack_settings):
    bucket = stack_settings.s3.bucket
    access, _ = stack.s3_credentials(stack_settings)
    wrong_secret = _client(stack_settings, secret="not-the-secret")
    unknown_key = _client(stack_settings, access="NOSUCHKEY")
    for wrong in (wrong_secret, unknown_key):
        with pytest.raises(ClientError) as raised:
            wrong.list_objects_v2(Bucket=bucket)
        assert raised.value.response["Error"]["Code"] in (
            "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"
        )
    anonymous = s3_client(stack_settings.s3_endpoint, None, None, signature_version=UNSIGNED)
    with pytest.raises(ClientError, match="AccessDenied"):
        anonymous.list_objects_v2(Bucket=bucket)
    with pytest.raises(ClientError, match="AccessDenied"):
        anonymous.put_object(Bucket=bucket, Key="anonymous.txt", Body=b"x")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(f"{stack_settings.s3_endpoint}/{bucket}/", timeout=5)
    assert raised.value.code == 403


# A driver: connects to the cluster at argv[1] and runs one task on it.
DRIVER = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
          "print('connected', ray.get(ray.remote(lambda: 41).remote()) + 1, flush=True)")
WRONG_TOKEN = "0" * 64


def _driver(address: str, home: Path, env: dict[str, str], timeout_s: float) -> str:
    """Output of DRIVER run in a fresh interpreter with `env` as its only Ray authentication
    settings and an empty home (no ~/.ray/auth_token to fall back on); a driver that is still
    waiting for the cluster after `timeout_s` is killed."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("RAY_AUTH") and k not in ("RAY_ADDRESS", _process.MARKER_ENV)}
    home.mkdir(exist_ok=True)
    try:
        done = subprocess.run([sys.executable, "-c", DRIVER, address], capture_output=True,
                              text=True, timeout=timeout_s, env={**base, "HOME": str(home), **env})
        return f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-2000:]}"
    except subprocess.TimeoutExpired as e:
        return f"killed after {timeout_s:g} s\n{e.stdout or ''}"


def test_ray_token_is_generated_private_into_the_home(started, stack_settings):
    path = stack_settings.embedded_ray_token_file
    assert path.parent == stack_settings.home / "stack"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(rayauth.token(stack_settings)) == 64


def test_jobs_and_serve_apis_refuse_requests_without_the_token(started, stack_settings, tmp_path):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from atelier.endpoint.deploy import ServeCluster
    from atelier.rayjobs import Jobs

    url = stack_settings.ray_dashboard
    ran = tmp_path / "ran"
    submission = {"entrypoint": f"python -c \"open('{ran}', 'w')\""}
    for method, path, body in [("GET", "/api/version", None), ("GET", "/api/jobs/", None),
                               ("POST", "/api/jobs/", submission),
                               ("GET", "/api/serve/applications/", None),
                               ("PUT", "/api/serve/applications/", {"applications": []})]:
        missing = requests.request(method, url + path, json=body, timeout=10)
        assert missing.status_code == 401, (method, path, missing.text)
        wrong = requests.request(method, url + path, json=body, timeout=10,
                                 headers=rayauth.bearer(WRONG_TOKEN))
        assert wrong.status_code == 403, (method, path, wrong.text)
    with pytest.raises(AuthenticationError):
        JobSubmissionClient(url)  # Ray's own client, with no token to send
    # With the token, our clients get through, and the refused submissions ran nothing.
    entrypoints = [job.entrypoint for job in Jobs(stack_settings).client.list_jobs()]
    assert submission["entrypoint"] not in entrypoints
    assert not ran.exists()
    assert "applications" in ServeCluster(stack_settings).details()


def test_a_driver_without_the_token_is_refused_and_with_it_runs_tasks(started, stack_settings,
                                                                     tmp_path):
    address = f"{stack_settings.stack.host}:{stack_settings.stack.ray_port}"
    token_file = stack_settings.embedded_ray_token_file
    # Each as close to the allowed one as can be: on loopback, only the token differs.
    loopback = {rayauth.SINGLE_MACHINE_ENV: "0"}
    for name, env in [("no token", {"RAY_AUTH_MODE": "disabled"}),
                      ("wrong token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": WRONG_TOKEN})]:
        t0 = time.monotonic()
        refused = _driver(address, tmp_path / "home", env | loopback, timeout_s=45)
        print(f"{name}: {refused.splitlines()[0]} after {time.monotonic() - t0:.1f} s")
        assert "connected" not in refused, name
    allowed = _driver(address, tmp_path / "home", rayauth.driver_env(token_file), timeout_s=120)
    assert allowed.startswith("exit 0") and "connected 42" in allowed, allowed


def test_a_jobs_driver_and_its_workers_get_the_token(started, stack_settings):
    from atelier.rayjobs import Jobs

    jobs = Jobs(stack_settings)
    job_id = jobs.submit(f'python -c "{DRIVER}" auto')
    lines: list[str] = []
    assert jobs.wait(job_id, on_line=lines.append, timeout_s=180) == "SUCCEEDED", lines[-20:]
    assert "connected 42" in lines


@contextmanager
def _busy_port() -> Iterator[int]:
    """A port this test occupies by construction: the kernel gives it to our listening socket.
    (A port picked free and bound afterwards can be taken in between, and refuses a plain bind
    while connections of its last user are in TIME_WAIT, which a stack's down leaves behind.)"""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_busy_port_gives_port_in_use_and_starts_nothing(tmp_path, free_stack_ports):
    with _busy_port() as busy:
        other = make_settings(tmp_path / "home", {**free_stack_ports(), "ray_port": busy})
        # The Ray port is checked before SeaweedFS starts: nothing may be left running.
        with pytest.raises(PortInUse, match=rf"port {busy} \(stack.ray_port\)"):
            stack.up(other)
    assert not any(s.running for s in stack.status(other).services)
    assert not _leftovers(other)


def test_port_of_a_running_stack_is_busy_for_another_home(started, stack_settings, tmp_path,
                                                          free_stack_ports):
    ports = {**free_stack_ports(), "s3_port": stack_settings.stack.s3_port}
    with pytest.raises(PortInUse, match=rf"port {ports['s3_port']} \(stack.s3_port\)"):
        stack.up(make_settings(tmp_path / "home", ports))


def test_failed_ray_start_stops_seaweedfs_again(tmp_path, free_stack_ports):
    other = make_settings(tmp_path / "home", free_stack_ports())
    blocker = default_temp_dir(other.home)
    blocker.write_text("a file where Ray wants its temp folder")
    try:
        with pytest.raises(ServiceError, match="ray start` exited"):
            stack.up(other)
        assert not any(s.running for s in stack.status(other).services)
        assert not _leftovers(other)
    finally:
        blocker.unlink()


def test_cli_status_exits_0(started, stack_settings, monkeypatch, capsys):
    from atelier.cli import main as cli

    _cli_env(monkeypatch, stack_settings)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.count("running") >= 2 and stack_settings.s3_endpoint in out


def test_cli_maps_busy_port_to_its_exit_code(tmp_path, free_stack_ports, monkeypatch, capsys):
    from atelier.cli import main as cli

    with _busy_port() as busy:
        other = make_settings(tmp_path / "home", {**free_stack_ports(), "ray_port": busy})
        _cli_env(monkeypatch, other)
        assert cli.main(["up"]) == PortInUse.exit_code
    expected = f"port {busy} (stack.ray_port) is already in use"
    assert expected in capsys.readouterr().err


def test_seaweed_fixture_restarts_with_its_data(seaweed):
    client = seaweed.client()
    client.put_object(Bucket=seaweed.bucket, Key="restart/a.bin", Body=b"\x00" * 1000)
    pid = seaweed.pid
    assert seaweed.stop() == 1
    assert not seaweed.running
    assert not psutil.pid_exists(pid) or _zombie(pid)
    assert seaweed.start()
    # Started means ready to write, not only to answer: the master hands out file ids at once
    # (after some restarts it refuses them for 15 s, "warming up", with every volume known).
    assign = requests.get(f"http://{seaweed.host}:{seaweed.master_port}/dir/assign",
                          params={"collection": seaweed.bucket}, timeout=30)
    assert assign.status_code == 200, assign.text
    client = seaweed.client()
    client.put_object(Bucket=seaweed.bucket, Key="restart/b.bin", Body=b"\x01" * 1000)
    for key, byte in [("restart/a.bin", b"\x00"), ("restart/b.bin", b"\x01")]:
        assert client.get_object(Bucket=seaweed.bucket, Key=key)["Body"].read() == byte * 1000
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=seaweed.bucket)["Contents"]]
    assert READY_PROBE_KEY not in keys  # the readiness check cleans up after itself


@pytest.fixture
def unrelated_ray(tmp_path, free_stack_ports):
    """Someone else's Ray head on this machine: plain `ray start`, its own ports and temp dir."""
    ports = free_stack_ports()
    temp_dir = Path(f"/tmp/atelier-test-{os.getpid()}")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop(_process.MARKER_ENV, None)
    base = ports["ray_port"]
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         "--node-ip-address", "127.0.0.1", "--port", str(base), "--num-cpus", "1",
         "--include-dashboard", "false", "--temp-dir", str(temp_dir),
         "--node-manager-port", str(base + 1), "--object-manager-port", str(base + 2),
         "--ray-client-server-port", str(base + 3), "--dashboard-agent-listen-port", str(base + 4),
         "--dashboard-agent-grpc-port", str(base + 5), "--runtime-env-agent-port", str(base + 6),
         "--min-worker-port", str(base + 10), "--max-worker-port", str(base + 60)],
        env={**env, "AUTOSCALER_METRIC_PORT": str(base + 7),
             "DASHBOARD_METRIC_PORT": str(base + 8)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (temp_dir / "ray_current_cluster").exists():
            assert head.poll() is None, "the unrelated Ray head exited"
            assert time.monotonic() < deadline, "the unrelated Ray head did not start"
            time.sleep(0.2)
        yield head
    finally:
        members = [p for p in psutil.process_iter() if _sid(p.pid) == head.pid]
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(60)
        time.sleep(2)
        for proc in members:
            try:
                proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_down_stops_only_ours_and_data_survives_restart(started, stack_settings, unrelated_ray):
    client = _client(stack_settings)
    client.put_object(Bucket=stack_settings.s3.bucket, Key="survives/down.txt", Body=b"kept")
    ours = _ours(stack_settings)
    theirs = [p for p in psutil.process_iter() if _sid(p.pid) == unrelated_ray.pid]
    assert len(ours) > 5 and len(theirs) > 3

    t0 = time.monotonic()
    result = stack.down(stack_settings)
    print(f"down took {time.monotonic() - t0:.1f} s: {[s.detail for s in result.services]}")
    assert not any(s.running for s in result.services)
    assert [p.pid for p in ours if p.is_running() and not _zombie(p.pid)] == []
    assert _leftovers(stack_settings) == []
    grpc_sockets = [f"/tmp/seaweedfs-{c}-grpc-{p + 10000}.sock" for c, p in
                    stack.status(stack_settings).service("seaweedfs").ports.items()]
    assert not [s for s in grpc_sockets if os.path.exists(s)], "down left sockets in /tmp"
    assert all(p.is_running() for p in theirs), "down touched a Ray it did not start"
    assert stack.down(stack_settings).service("ray").detail == "was not running"

    t0 = time.monotonic()
    assert stack.up(stack_settings).running
    print(f"second up took {time.monotonic() - t0:.1f} s")
    client = _client(stack_settings)
    body = client.get_object(Bucket=stack_settings.s3.bucket, Key="survives/down.txt")
    assert body["Body"].read() == b"kept"


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _cli_env(monkeypatch, settings: Settings) -> None:
    monkeypatch.setenv("ATELIER_HOME", str(settings.home))
    for name in ("s3_port", "master_port", "volume_port", "filer_port", "ray_port",
                 "dashboard_port", "metrics_port"):
        monkeypatch.setenv(f"ATELIER_STACK__{name.upper()}", str(getattr(settings.stack, name)))

