"""The optional bearer token: where a replica finds its key (``api_key_env`` / ``api_key_file``,
never the key itself in Serve's config), and the check of a request's ``Authorization`` value
(an HTTP header or gRPC metadata alike)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from placesnet.serve.errors import ClientError


def read_api_key(env_name: str = "", key_file: str = "") -> str | None:
    """The endpoint's key: the environment variable ``env_name``, else the file named by
    ``<env_name>_FILE`` (the Docker/Kubernetes secrets convention) or by ``key_file``. None when
    neither option is set; RuntimeError when one is set but yields no key."""
    if not env_name and not key_file:
        return None
    if env_name and os.environ.get(env_name, "").strip():
        return os.environ[env_name].strip()
    path = key_file or (os.environ.get(f"{env_name}_FILE", "") if env_name else "")
    if not path:
        raise RuntimeError(f"no API key: ${env_name} and ${env_name}_FILE are unset where this replica runs")
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise RuntimeError(f"API key file {path}: {e.strerror}") from None
    if not key:
        raise RuntimeError(f"API key file {path} is empty")
    return key


def check_bearer(authorization: str, key: str | None) -> None:
    """Nothing when no key is set or ``authorization`` is ``Bearer <key>``; else ClientError 401
    (with ``WWW-Authenticate: Bearer``). Compared in constant time."""
    if key is None:
        return
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ClientError(
            401,
            "missing or wrong bearer token: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
            reason="unauthorized",
        )


class Secret:
    """A key on its way from the deploying shell to the replicas (an init argument of the
    deployment, which Serve keeps serialized in its controller and never prints): its repr, in a
    log or a traceback, does not show it."""

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(****)"
