"""Credentials never travel in er's own arguments.

Storage options reach Ray task and actor arguments, `train_loop_config` and saved configs, and Ray
writes those to its session logs in plain text. So options that carry a credential are refused;
credentials come from the standard AWS chain (environment, profile, instance role, IRSA) instead.
"""

from __future__ import annotations

from .errors import ErError

__all__ = ["SECRET_NAMES", "find_secrets", "reject_secrets"]

# fsspec/s3fs and botocore spellings of a credential; matched case-insensitively, at any depth.
SECRET_NAMES = frozenset({"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                          "aws_session_token"})


def find_secrets(options, where: str = "storage_options") -> list[str]:
    """Where in `options` (dicts and lists, nested) a credential is set, e.g. "storage_options['secret']"."""
    found: list[str] = []
    if isinstance(options, dict):
        for k, v in options.items():
            path = f"{where}[{k!r}]"
            if str(k).lower() in SECRET_NAMES and v not in (None, ""):
                found.append(path)
            else:
                found += find_secrets(v, path)
    elif isinstance(options, (list, tuple)):
        for i, v in enumerate(options):
            found += find_secrets(v, f"{where}[{i}]")
    return found


def reject_secrets(options, where: str = "storage_options") -> None:
    """Raise ErError naming (never echoing) every credential in `options`."""
    found = find_secrets(options, where)
    if found:
        raise ErError(
            f"{', '.join(found)} holds a credential, and er does not pass credentials in its arguments (Ray would "
            f"write them to its logs). Remove it and give credentials the standard way: AWS_ACCESS_KEY_ID / "
            f"AWS_SECRET_ACCESS_KEY in the environment, a profile (AWS_PROFILE), or an instance role / IRSA on every node"
        )
