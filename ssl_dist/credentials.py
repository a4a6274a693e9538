"""What may reach the metadata Ray stores and shows with a job or a worker group (a job's
runtime_env and entrypoint, Train's worker_runtime_env), where everyone who can list jobs on the
dashboard reads it: variables whose names look like credentials never do, nor URLs with a
password in them; a job gets an allow-list of non-secret MLflow settings and our own knobs.
Workers on a cluster get credentials from the cluster's own environment instead (see README,
`ssl-dist submit`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from ssl_dist.config import ConfigError

SECRET_MARKERS = ("TOKEN", "PASS", "SECRET", "KEY", "CREDENTIAL", "AUTH", "PRIVATE", "COOKIE")
"""A variable whose name contains one of these (any case) may hold a credential (PASS: also
PASSWORD, PASSWD, PASSPHRASE)."""

SECRET_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "GCP_", "GCLOUD_", "DATABRICKS_", "HF_", "GH_")
"""Cloud and service SDK variables: identities, keys and tokens; none is forwarded."""

_URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s:]*:[^/?#@\s]*@")


def looks_secret(name: str) -> bool:
    """Whether the variable `name` may hold a credential, judged by its name alone: values
    stored with a job are readable by everyone who can list jobs, so in doubt it stays out."""
    upper = name.upper()
    return upper.startswith(SECRET_PREFIXES) or any(m in upper for m in SECRET_MARKERS)


def has_url_password(text: str) -> bool:
    """Whether `text` holds a URL with a password in it (``scheme://user:password@host``),
    anywhere (``tracking.uri=https://...`` too)."""
    return _URL_PASSWORD.search(text) is not None


FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
)
"""Local MLflow variables passed to the job: where to log, never how to log in."""

FORWARDED_PREFIXES = ("SSL_DIST_",)
"""Our own knobs, passed to the job unless `looks_secret`."""

WITHHELD_PREFIXES = ("MLFLOW_", "SSL_DIST_")
"""Local variables the job does not get are named in a note when they have these prefixes."""

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` as a dict; ConfigError naming a malformed pair."""
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise ConfigError(f"--env {pair!r}: expected KEY=VALUE with KEY a variable name")
        env[key] = value
    return env


def forwarded(name: str) -> bool:
    """Whether the local variable `name` is passed to the job by default."""
    allowed = name in FORWARDED_ENV or name.startswith(FORWARDED_PREFIXES)
    return allowed and not looks_secret(name)


def job_env(extra: dict[str, str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables for the job: the `forwarded` local ones, then ``--env``. ConfigError for a
    credential: an ``--env`` name that `looks_secret`, or a URL with a password in any value."""
    local = os.environ if environ is None else environ
    for key in extra:
        if looks_secret(key):
            raise ConfigError(
                f"--env {key}: looks like a credential, and a job's environment is readable by "
                f"anyone who can list jobs; give it to the workers through the cluster's own "
                f"environment (see `ssl-dist submit` in the README)"
            )
    env = {k: v for k, v in local.items() if forwarded(k)}
    env.update(extra)
    for key, value in env.items():
        if has_url_password(value):
            raise ConfigError(
                f"{key} holds a URL with a password, which would be readable with the job: "
                f"drop the password from it and give it to the workers through the cluster's "
                f"own environment (e.g. MLFLOW_TRACKING_PASSWORD there)"
            )
    return env


def withheld_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Local ``MLFLOW_*`` / ``SSL_DIST_*`` variables the job does not get (for a note)."""
    local = os.environ if environ is None else environ
    return sorted(k for k in local if k.startswith(WITHHELD_PREFIXES) and not forwarded(k))


def check_arguments(command: list[str]) -> None:
    """ConfigError for an argument holding a URL with a password (the entrypoint is stored
    with the job too)."""
    for arg in command:
        if has_url_password(arg):
            raise ConfigError(
                "an argument holds a URL with a password, which would be readable with the job: "
                "give the credentials to the workers through the cluster's own environment"
            )
