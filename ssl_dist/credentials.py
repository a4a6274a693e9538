"""Which environment variables may hold credentials, judged by name: such values never go into
what Ray stores and shows with a job or a worker group (job runtime_env, Train's
worker_runtime_env), where everyone who can list jobs on the dashboard reads them. Workers on
a cluster get credentials from the cluster's own environment instead (see README, submit)."""

from __future__ import annotations

import re

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
