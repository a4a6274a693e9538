"""`ssl-dist submit`: Ray jobs on a real local head started with `ray start`, token auth on.

The head runs in its own session under a private temp dir (/tmp/rsub-*), and is stopped by
signalling only its own processes (see `_stop_head`): `ray stop` would stop every Ray instance
on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import requests
import typer
from typer.testing import CliRunner

from ssl_dist.config import ConfigError
from ssl_dist.credentials import (
    check_arguments,
    forwarded,
    job_env,
    looks_secret,
    parse_env,
    withheld_env,
)
from ssl_dist.dist.spawn import free_port
from ssl_dist.submit import (
    EXCLUDES,
    build_entrypoint,
    build_runtime_env,
    project_requirements,
    register,
    submit,
)

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# The real `ssl-dist` main (exit codes, one-line errors) with `submit` added, until cli.py has it.
CLI = [
    sys.executable,
    "-c",
    "from ssl_dist import cli; from ssl_dist.submit import register; register(cli.app); cli.main()",
]


def _run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [*CLI, "submit", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop one `ray start --block` head and everything it started, nothing else.

    Targets: (1) its descendants, listed before it is signalled (Ray's workers and job drivers
    live in their own process groups); (2) its process group, a fresh session made for it by
    start_new_session; (3) any process whose command line or cwd lies under its private temp dir.
    """
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    proc.terminate()  # `ray start --block` drains and stops its own processes on SIGTERM
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)

    def under_temp_dir(p: psutil.Process) -> bool:
        try:
            return temp_dir in " ".join(p.cmdline()) or p.cwd().startswith(temp_dir)
        except psutil.Error:
            return False

    left = [p for p in tree if p.is_running()]
    left += [p for p in psutil.process_iter() if p.pid != os.getpid() and under_temp_dir(p)]
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    """A local head with the dashboard on 127.0.0.1 and token authentication."""
    from ray._private.utils import get_dashboard_dependency_error

    if missing := get_dashboard_dependency_error():
        pytest.fail(f"the Job API needs the dashboard, i.e. ray[default]: {missing}")
    temp_dir = tempfile.mkdtemp(prefix="rsub-", dir="/tmp")  # short: unix socket paths
    token = secrets.token_hex(16)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_", "RAY_API_SERVER"))
    }
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )  # `python` of the job
    dash = free_port()
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited: {(Path(temp_dir) / 'ray-start.log').read_text()}")
            with contextlib.suppress(requests.RequestException):
                r = requests.get(
                    f"{address}/api/jobs/", timeout=2, headers={"Authorization": f"Bearer {token}"}
                )
                if r.status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("the Ray dashboard did not come up in 90 s")
            time.sleep(0.3)
        yield SimpleNamespace(address=address, token=token, temp_dir=temp_dir)
    finally:
        _stop_head(proc, temp_dir)
        log.close()


@pytest.fixture
def authed(head, monkeypatch):
    """This process talks to the head with its token."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    for name in ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)  # they would override --address
    return head


# --- no cluster ---------------------------------------------------------------------------


@pytest.mark.ray
def test_entrypoint_and_env_parsing():
    assert build_entrypoint(["pretrain", "-c", "a b.yaml", "-o", "optim.lr=0.3"]) == (
        "python -m ssl_dist.cli pretrain -c 'a b.yaml' -o optim.lr=0.3"
    )
    for bad in ([], ["knn", "x"], ["data", "prepare"], ["--print-config"]):
        with pytest.raises(ConfigError, match="pretrain, finetune, retrain|command to run"):
            build_entrypoint(bad)
    assert parse_env(["A=1", "B_2=x=y", "C="]) == {"A": "1", "B_2": "x=y", "C": ""}
    for pair in ("A", "=1", "1A=2", "A-B=1"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_env([pair])


@pytest.mark.ray
def test_runtime_env(tmp_path):
    renv = build_runtime_env(ROOT, env={"K": "v"})
    assert renv["working_dir"] == str(ROOT) and "py_modules" not in renv
    assert renv["excludes"] == EXCLUDES
    assert {"/.venv", "/work", "/bench-results", ".git", "__pycache__"} <= set(EXCLUDES)
    assert {".env", ".netrc", "*.pem", "credentials"} <= set(EXCLUDES)  # credential files stay
    assert renv["env_vars"] == {"K": "v"} and "pip" not in renv
    # Another folder: the local ssl_dist package travels as a py_module.
    renv = build_runtime_env(tmp_path, pip=True)
    assert renv["py_modules"] == [str(ROOT / "ssl_dist")]
    assert renv["pip"] == project_requirements()
    assert any(r.startswith("torch") for r in renv["pip"])
    assert not any(r.startswith("ray") for r in renv["pip"])  # the cluster's Ray stays
    with pytest.raises(ConfigError, match="not a directory"):
        build_runtime_env(tmp_path / "missing")


@pytest.mark.ray
@pytest.mark.parametrize("command", [["knn", "ckpt"], ["data", "prepare"], []])
def test_disallowed_subcommand_exits_2_without_contacting_the_cluster(command):
    with socket.socket() as listener:  # would see any connection attempt
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        r = _run_cli("--address", f"http://127.0.0.1:{port}", "--", *command)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "pretrain, finetune, retrain" in r.stderr or "command to run" in r.stderr


@pytest.mark.unit
def test_only_non_secret_variables_are_forwarded():
    for name in (
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_PASSWORD",
        "AWS_ACCESS_KEY_ID",
        "AWS_REGION",
        "HF_TOKEN",
        "SSL_DIST_API_KEY",
        "MY_SECRET",
        "db_passwd",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "RAY_AUTH_TOKEN",
        "SESSION_COOKIE",
    ):
        assert looks_secret(name), name
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "SSL_DIST_LOG", "SUBMIT_TEST"):
        assert not looks_secret(name), name
    assert forwarded("MLFLOW_REGISTRY_URI") and forwarded("SSL_DIST_NO_PROGRESS")
    assert not forwarded("MLFLOW_TRACKING_USERNAME")  # not on the allow-list
    assert not forwarded("SSL_DIST_TOKEN") and not forwarded("HOME")
    local = {
        "MLFLOW_TRACKING_URI": "https://mlflow.example:5000",
        "MLFLOW_TRACKING_TOKEN": "t0ken",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "MLFLOW_TRACKING_USERNAME": "me",
        "SSL_DIST_LOG": "DEBUG",
        "AWS_SECRET_ACCESS_KEY": "k",
        "PATH": "/bin",
    }
    assert job_env({"X": "1"}, local) == {
        "MLFLOW_TRACKING_URI": "https://mlflow.example:5000",
        "SSL_DIST_LOG": "DEBUG",
        "X": "1",
    }
    assert withheld_env(local) == [
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
    ]
    with pytest.raises(ConfigError, match="--env MLFLOW_TRACKING_TOKEN: looks like a credential"):
        job_env({"MLFLOW_TRACKING_TOKEN": "t0ken"}, {})
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI holds a URL with a password"):
        job_env({}, {"MLFLOW_TRACKING_URI": "https://me:pw@mlflow.example"})
    with pytest.raises(ConfigError, match="URL with a password"):
        check_arguments(["pretrain", "-o", "tracking.uri=http://me:pw@host:5000/x"])
    check_arguments(["pretrain", "-o", "tracking.uri=http://me@host:5000", "-c", "a:b@c.yaml"])


@pytest.mark.ray
@pytest.mark.parametrize(
    "args",
    [
        ["--env", "MLFLOW_TRACKING_TOKEN=s3cr3t-value", "--", "pretrain"],
        ["-e", "AWS_SECRET_ACCESS_KEY=s3cr3t-value", "pretrain"],
        ["--", "pretrain", "-o", "tracking.uri=https://me:s3cr3t-value@mlflow.example"],
    ],
)
def test_credentials_on_the_command_line_exit_2_without_contacting_the_cluster(args):
    with socket.socket() as listener:  # would see any connection attempt
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        r = _run_cli("--address", f"http://127.0.0.1:{listener.getsockname()[1]}", *args)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "credential" in r.stderr or "password" in r.stderr
    assert "s3cr3t-value" not in r.stderr + r.stdout


@pytest.mark.ray
def test_unreachable_address_exits_2_quickly():
    port = free_port()  # nothing listens there
    start = time.monotonic()
    r = _run_cli("--address", f"127.0.0.1:{port}", "--", "pretrain", timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        f"error: cannot reach the Ray dashboard at http://127.0.0.1:{port}: connection refused"
    )
    # A server that accepts but never answers: bounded by --connect-timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        addr = f"http://127.0.0.1:{silent.getsockname()[1]}"
        r = _run_cli("--address", addr, "--connect-timeout", "1", "--", "pretrain", timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: no answer from the Ray dashboard at {addr} in 1s"
    assert time.monotonic() - start < 20


# --- on the head ----------------------------------------------------------------------------


@pytest.mark.ray
def test_token_auth_required(head, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(ConfigError, match="needs token authentication: set RAY_AUTH_MODE=token"):
        submit(head.address, ["pretrain", "--print-config"])
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 32)
    with pytest.raises(ConfigError, match="the token was refused"):
        submit(head.address, ["pretrain", "--print-config"])


@pytest.mark.ray
def test_job_streams_logs_and_succeeds(authed, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.invalid:5000")
    # The job prints its config and the environment it got.
    rc = submit(
        authed.address,
        ["pretrain", "--print-config", "-c", "launch/recipes/tiny.yaml", "-o", "run.max_steps=7"],
        env=["SUBMIT_TEST=hello"],
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "max_steps: 7" in out and "name: tiny" in out  # streamed from the job
    assert "SUCCEEDED" in err.splitlines()[-1]
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(
        authed.address, headers={"Authorization": f"Bearer {authed.token}"}
    )
    job = [j for j in client.list_jobs() if "max_steps=7" in j.entrypoint][-1]
    assert job.entrypoint.startswith("python -m ssl_dist.cli pretrain --print-config")
    env_vars = (job.runtime_env or {})["env_vars"]
    assert env_vars["SUBMIT_TEST"] == "hello"
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://tracking.invalid:5000"
    assert not any(k.startswith("RAY_AUTH") for k in env_vars)


@pytest.mark.ray
def test_credentials_stay_out_of_the_job(authed, capsys, monkeypatch):
    """Nothing the job API returns about the job holds a local credential."""
    token, password = secrets.token_hex(16), secrets.token_hex(16)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.invalid:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", password)
    job_id = f"ssl-dist-test-{secrets.token_hex(4)}"
    assert submit(authed.address, ["pretrain", "--print-config"], job_id=job_id) == 0
    err = capsys.readouterr().err
    assert "kept local" in err and "MLFLOW_TRACKING_TOKEN" in err and token not in err
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {authed.token}"}
    info = JobSubmissionClient(authed.address, headers=headers).get_job_info(job_id)
    assert info.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://tracking.invalid:5000"
    assert "MLFLOW_TRACKING_TOKEN" not in info.runtime_env["env_vars"]
    raw = requests.get(f"{authed.address}/api/jobs/{job_id}", headers=headers, timeout=10).text
    listed = requests.get(f"{authed.address}/api/jobs/", headers=headers, timeout=10).text
    metadata = json.dumps(info.metadata)
    assert token not in metadata and password not in metadata
    for whole in (info.model_dump_json(), raw, listed):  # the job as the job API shows it
        assert "http://tracking.invalid:5000" in whole
        assert token not in whole and password not in whole


@pytest.mark.ray
def test_failing_job_exits_1_through_the_cli(authed):
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so that `submit` is a subcommand
    register(app)
    # No `--` needed: from the subcommand on, every argument is the job's.
    args = ["submit", "--address", authed.address, "pretrain", "--config", "missing.yaml"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    assert "missing.yaml" in r.stdout and "does not exist" in r.stdout  # the job's own error
    assert "FAILED" in r.stderr.strip().splitlines()[-1]


@pytest.mark.ray
def test_no_wait_prints_the_id_and_how_to_follow(authed, capsys):
    job_id = f"ssl-dist-test-{secrets.token_hex(4)}"
    args = ["pretrain", "--print-config"]
    assert submit(authed.address, args, wait=False, job_id=job_id) == 0
    out, err = capsys.readouterr()
    assert out.strip() == job_id
    assert f"ray job logs -f {job_id} --address {authed.address}" in err
    assert f"ray job stop {job_id}" in err
    with pytest.raises(ConfigError, match="already exists"):
        submit(authed.address, args, wait=False, job_id=job_id)


@pytest.mark.ray
def test_ctrl_c_stops_following_not_the_job(authed, capsys, monkeypatch):
    import ssl_dist.submit as sub

    def interrupted(client, job_id):
        raise KeyboardInterrupt

    monkeypatch.setattr(sub, "follow", interrupted)
    job_id = f"ssl-dist-test-{secrets.token_hex(4)}"
    assert submit(authed.address, ["pretrain", "--print-config"], job_id=job_id) == 130
    err = capsys.readouterr().err
    assert f"job {job_id} keeps running" in err and f"ray job stop {job_id}" in err
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(
        authed.address, headers={"Authorization": f"Bearer {authed.token}"}
    )
    deadline = time.monotonic() + 60
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get_job_status(job_id).value == "SUCCEEDED"


@pytest.mark.unit
def test_worker_env_keeps_credentials_out(monkeypatch):
    """Train's worker_runtime_env is shown on the dashboard too: no MLflow credential in it."""
    from ssl_dist.train.driver import _worker_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    monkeypatch.setenv("SSL_DIST_NO_PROGRESS", "1")
    env = _worker_env(use_gpu=False)
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example:5000"
    assert env["SSL_DIST_NO_PROGRESS"] == "1" and env["DS_ACCELERATOR"] == "cpu"
    assert "t0ken" not in env.values() and "pw" not in env.values()
