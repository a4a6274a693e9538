"""`ssl-dist submit`: run `pretrain` / `finetune` / `retrain` on a Ray cluster as a Ray job.

The job runs ``python -m ssl_dist.cli <subcommand> <args>`` on the head node through the Job
Submission API (the dashboard's HTTP port, 8265 by default), so it does not need the `ssl-dist`
console script on the cluster. The runtime_env ships this project:

- ``working_dir``: the local working directory (default: the current one), without virtual
  environments, `work/`, `bench-results/`, `.git` and caches; it is the job's current directory,
  so relative recipe paths (``launch/recipes/x.yaml``) resolve as they do locally;
- ``py_modules``: the local `ssl_dist` package as well, when it does not lie inside that folder;
- ``pip`` (``--pip``): the project's dependencies except Ray; off by default, the cluster image
  is expected to have them;
- ``env_vars``: the local non-secret MLflow settings in `credentials.FORWARDED_ENV` (tracking
  and registry URI, experiment, HTTP retries), every ``SSL_DIST_*`` knob (log level, progress
  bars), and each ``--env KEY=VALUE``.

Secrets never travel with the job (its runtime_env, entrypoint and metadata are readable by
anyone who can list jobs): the rules are `ssl_dist.credentials`' (a credential-like variable
is not forwarded and is refused with ``--env``, one note on stderr names what stayed local; a
URL with a password is refused). Workers get credentials from the cluster's own environment
(variables set before ``ray start``, a Kubernetes Secret as in ``cluster/k8s``, the nodes'
cloud identity, or a file on the nodes such as ``~/.mlflow/credentials``).

Token authentication (``RAY_AUTH_MODE=token`` on the cluster): set it locally too, with the
token in ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names or ``~/.ray/auth_token`` (as
the `ray` CLI); it is sent as ``Authorization: Bearer ...``, never put into the runtime_env (the
job inherits the cluster's own token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer

from ssl_dist.config import ConfigError
from ssl_dist.credentials import check_arguments, job_env, parse_env, withheld_env

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

ALLOWED = ("pretrain", "finetune", "retrain")
"""Subcommands that may run as a job (the others are local tools)."""

EXCLUDES = [
    "/.venv",
    "/venv",
    "/work",
    "/bench-results",
    "/runs",
    "/.demo",
    "/mlruns",
    "/mlartifacts",
    ".git",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "*.egg-info",
    ".ipynb_checkpoints",
    # Credential files never travel with the job (its files are readable on the cluster).
    ".env",
    ".env.*",
    ".netrc",
    "*.pem",
    "*.key",
    "credentials",
    "credentials.json",
]
"""runtime_env excludes (gitignore syntax; a leading / anchors at the working_dir)."""

CONNECT_TIMEOUT_S = 10.0
"""Default bound on the first request to the dashboard."""

CONTEXT_SETTINGS: dict[str, Any] = {
    "allow_interspersed_args": False,
    "ignore_unknown_options": True,
}
"""Everything from the subcommand on is the job's, with or without ``--``."""

_QUIET = {
    # "Uploading package ...", "Ignoring upload to cluster for these files: [.gitignore]"
    "ray._private.runtime_env.packaging": logging.WARNING,
    "ray.dashboard.modules.dashboard_sdk": logging.WARNING,
    "ray.dashboard.modules.job.sdk": logging.WARNING,  # "WebSocket closed for job ..."
    # "Directory '.git' is now ignored by default": we exclude it anyway.
    "ray._private.runtime_env.working_dir": logging.ERROR,
}


def build_entrypoint(command: list[str]) -> str:
    """The job's shell command for ``[subcommand, *args]``; ConfigError for anything but
    pretrain, finetune and retrain."""
    if not command:
        raise ConfigError(
            f"give the command to run: ssl-dist submit --address URL -- "
            f"{{{','.join(ALLOWED)}}} ARGS..."
        )
    sub = command[0]
    if sub not in ALLOWED:
        what = "unknown option" if sub.startswith("-") else "cannot submit"
        raise ConfigError(f"{what} {sub!r}: the job must be one of {', '.join(ALLOWED)}")
    return shlex.join(["python", "-m", "ssl_dist.cli", *command])


def project_requirements() -> list[str]:
    """The installed project's runtime dependencies, without Ray (the cluster's Ray stays)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        reqs = requires("ssl-dist") or []
    except PackageNotFoundError as e:
        raise ConfigError("--pip needs the ssl-dist package installed here") from e
    out = []
    for line in reqs:
        req = Requirement(line)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        if req.name.lower() != "ray":
            out.append(str(req))
    return out


def build_runtime_env(
    working_dir: Path, pip: bool = False, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """The job's runtime_env: this project as working_dir (plus the ssl_dist package as a
    py_module when it lies elsewhere), optionally pip dependencies, and env vars."""
    import ssl_dist

    wd = working_dir.expanduser().resolve()
    if not wd.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: not a directory")
    renv: dict[str, Any] = {"working_dir": str(wd), "excludes": list(EXCLUDES)}
    package = Path(ssl_dist.__file__).resolve().parent
    if (wd / "ssl_dist").resolve() != package:
        renv["py_modules"] = [str(package)]
    if pip:
        renv["pip"] = project_requirements()
    if env:
        renv["env_vars"] = dict(env)
    return renv


def normalize_address(address: str) -> str:
    """``host:port`` → ``http://host:port``; only http(s) dashboard addresses are accepted."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--address {address}: give the dashboard's HTTP address, e.g. http://HEAD:8265"
        )
    return address


def auth_headers() -> dict[str, str]:
    """``Authorization`` for clusters with token authentication (``RAY_AUTH_MODE=token``),
    from ``RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; {} otherwise."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        try:
            token = path.expanduser().read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                f"({path}: {e.strerror or e})"
            ) from e
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    """Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its address argument."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> JobSubmissionClient:
    """A client for the dashboard at `address`, after one bounded request to it; ConfigError
    (one line naming the address) when it is unreachable, not a dashboard or refuses us."""
    import requests

    headers = auth_headers()
    try:
        r = requests.get(f"{address}/api/version", headers=headers, timeout=timeout_s)
    except requests.Timeout as e:
        raise ConfigError(f"no answer from the Ray dashboard at {address} in {timeout_s:g}s") from e
    except requests.RequestException as e:
        raise ConfigError(f"cannot reach the Ray dashboard at {address}: {_reason(e)}") from e
    if r.status_code in (401, 403):
        hint = (
            "the token was refused"
            if headers
            else "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"
        )
        raise ConfigError(f"the Ray cluster at {address} needs token authentication: {hint}")
    try:
        r.raise_for_status()
        r.json()["ray_version"]
    except Exception as e:
        raise ConfigError(
            f"{address} is not a Ray dashboard with the Job API (HTTP {r.status_code})"
        ) from e

    from ray.job_submission import JobSubmissionClient

    if os.environ.get("SSL_DIST_LOG", "").upper() not in ("INFO", "DEBUG"):
        for name, level in _QUIET.items():  # after the import: Ray's modules set INFO there
            logging.getLogger(name).setLevel(level)
    with _without_env("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        try:
            return JobSubmissionClient(address, headers=headers)
        except ConnectionError as e:
            raise ConfigError(f"cannot reach the Ray dashboard at {address}: {e}") from e


def _reason(e: Exception) -> str:
    text = str(e)
    for known in ("Connection refused", "Name or service not known", "No route to host"):
        if known in text:
            return known.lower()
    return type(e).__name__


def _hints(job_id: str, address: str) -> list[str]:
    a = shlex.quote(address)
    return [
        f"follow: ray job logs -f {job_id} --address {a}",
        f"status: ray job status {job_id} --address {a}",
        f"stop:   ray job stop {job_id} --address {a}",
    ]


async def _tail(client: JobSubmissionClient, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def follow(client: JobSubmissionClient, job_id: str, poll_s: float = 0.5) -> str:
    """Stream the job's logs to stdout until it ends; return its final status name.
    KeyboardInterrupt propagates (the job keeps running)."""
    from ray.job_submission import JobStatus

    try:
        asyncio.run(_tail(client, job_id))
    except RuntimeError as e:  # the log stream broke off; the status still tells the outcome
        typer.echo(f"log stream ended early ({e}); waiting for the job's status", err=True)
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(poll_s)


def submit(
    address: str,
    command: list[str],
    *,
    wait: bool = True,
    working_dir: Path = Path("."),
    pip: bool = False,
    env: list[str] | None = None,
    job_id: str | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> int:
    """Submit ``ssl-dist <command>`` as a Ray job; return the exit code: 0 submitted (no wait)
    or SUCCEEDED, 1 FAILED or STOPPED, 130 interrupted while following. Bad input, an
    unreachable or refusing cluster raise ConfigError before anything is submitted."""
    entrypoint = build_entrypoint(command)
    check_arguments(command)
    address = normalize_address(address)
    renv = build_runtime_env(working_dir, pip, job_env(parse_env(env)))
    if withheld := withheld_env():
        names = ", ".join(withheld)
        typer.echo(
            f"kept local (the cluster's environment provides credentials): {names}", err=True
        )
    client = connect(address, connect_timeout_s)
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=renv, submission_id=job_id)
    except RuntimeError as e:
        if "already exists" in str(e):
            raise ConfigError(f"--job-id {job_id}: a job with this id already exists") from e
        raise
    if not wait:
        typer.echo(job_id)
        for line in _hints(job_id, address):
            typer.echo(line, err=True)
        return 0
    typer.echo(f"submitted {job_id} to {address}: {entrypoint}", err=True)
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; job {job_id} keeps running", err=True)
        for line in _hints(job_id, address):
            typer.echo(line, err=True)
        return 130
    message = ""
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        first = (info.message or "").strip().splitlines()
        message = f": {first[0]}" if first else ""
    typer.echo(f"job {job_id} {status}{message}", err=True)
    return 0 if status == "SUCCEEDED" else 1


def submit_command(
    address: Annotated[
        str,
        typer.Option(
            envvar="RAY_API_SERVER_ADDRESS",
            help="Ray dashboard (Job API) address, e.g. http://HEAD:8265.",
        ),
    ],
    command: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="{pretrain|finetune|retrain} ARGS...",
            help="The command to run on the cluster and its options (after --).",
            show_default=False,
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Stream the job's logs and exit with its outcome.")
    ] = True,
    working_dir: Annotated[
        Path, typer.Option(help="Folder shipped as the job's working_dir.")
    ] = Path("."),
    pip: Annotated[
        bool, typer.Option(help="Install the project's dependencies (not Ray) in the job.")
    ] = False,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="KEY=VALUE for the job's environment (repeatable)."),
    ] = None,
    job_id: Annotated[str | None, typer.Option(help="Submission id (default: Ray's).")] = None,
    connect_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the dashboard's first answer.")
    ] = CONNECT_TIMEOUT_S,
) -> None:
    """Run pretrain, finetune or retrain on a Ray cluster as a Ray job.

    Example: ssl-dist submit --address http://HEAD:8265 -- pretrain -c launch/recipes/x.yaml

    Runs `python -m ssl_dist.cli ...` in a copy of --working-dir (no .venv, work/, .git, caches).

    The job gets the local MLflow URIs and experiment, SSL_DIST_* variables, and each --env;
    never credentials (names with TOKEN, PASSWORD, SECRET, KEY, AUTH, ...: exit 2 with --env).
    Workers take those from the cluster's environment.

    --wait (default): stream the logs; exit 0 if the job SUCCEEDED, 1 if FAILED or STOPPED.

    Ctrl-C stops following, not the job. --no-wait prints the job id.

    Token auth: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH).

    Exit 2: bad arguments, or the cluster cannot be reached or refuses the token.
    """
    rc = submit(
        address,
        list(command or []),
        wait=wait,
        working_dir=working_dir,
        pip=pip,
        env=env,
        job_id=job_id,
        connect_timeout_s=connect_timeout,
    )
    if rc:
        raise typer.Exit(rc)


def register(app: typer.Typer) -> None:
    """Add `submit` to `app` (once), with the context settings that pass everything from the
    subcommand on to the job even without ``--``."""
    if any(c.name == "submit" for c in app.registered_commands):
        return
    app.command("submit", context_settings=CONTEXT_SETTINGS)(submit_command)
