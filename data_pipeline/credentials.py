"""Finding credentials where none may be given: fsspec storage options and dataset URLs.

``data.storage_options`` is recorded in plain text (config.yaml, checkpoints, W&B files) and
``sfd-data`` flags land in shell histories and job logs, so a secret there would leak. Both the
config validation and ``sfd-data`` ask this module, so they refuse the same things.
"""

from __future__ import annotations

from typing import Any, Mapping
from urllib.parse import urlsplit

# Option names (compared case-insensitively, '-' as '_') that carry a secret in fsspec
# back ends: s3fs (key, secret, token), adlfs (account_key, sas_token, connection_string,
# credential, client_secret), gcsfs (token), and the generic ones.
CREDENTIAL_KEYS = frozenset({
    "key", "secret", "token", "password", "passwd", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "account_key", "sas_token", "connection_string", "credential", "credentials",
    "client_secret", "api_key",
})

# gcsfs takes `token` as the name of an authentication method as well; these hold no secret.
_TOKEN_METHODS = frozenset({"anon", "google_default", "cache", "cloud", "browser"})


def how_to_give_credentials(profile_option: str) -> str:
    """The advice that ends every refusal; ``profile_option`` is how the caller's users name a profile."""
    return ("give credentials through the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
            f"AWS_SESSION_TOKEN), ~/.aws/credentials, or name an AWS profile with {profile_option}")


def _is_secret(name: str, value: Any) -> bool:
    """Whether option ``name`` set to ``value`` is a credential (an unset one holds nothing)."""
    name = name.lower().replace("-", "_")
    if name not in CREDENTIAL_KEYS or value is None or value == "":
        return False
    return not (name == "token" and isinstance(value, str) and value in _TOKEN_METHODS)


def credential_keys(options: Any, prefix: str = "") -> list[str]:
    """Dotted names of the credentials in ``options``, searched through nested mappings and lists.

    Args:
        options: storage options as given (``client_kwargs`` and the like may nest).
        prefix: dotted name of ``options`` itself, put in front of every name found.

    Returns:
        e.g. ``["client_kwargs.aws_secret_access_key"]``; empty when there is none. Values are
        never part of the result, so it can be printed.
    """
    found: list[str] = []
    if isinstance(options, Mapping):
        for name, value in options.items():
            dotted = f"{prefix}.{name}" if prefix else str(name)
            if _is_secret(str(name), value):
                found.append(dotted)
            else:
                found.extend(credential_keys(value, dotted))
    elif isinstance(options, (list, tuple)):
        for index, value in enumerate(options):
            found.extend(credential_keys(value, f"{prefix}.{index}" if prefix else str(index)))
    return found


def url_has_password(path: str) -> bool:
    """Whether ``path`` is a URL with a password in it (``scheme://user:password@host/...``)."""
    if "://" not in str(path):
        return False
    try:
        return bool(urlsplit(str(path)).password)
    except ValueError:  # a malformed netloc: let the storage layer report it
        return False


def without_password(path: str) -> str:
    """``path`` with the password of its user part replaced by ``***``, for messages."""
    parts = urlsplit(str(path))
    user, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}").geturl()
