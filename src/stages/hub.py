"""Downloads from the Hugging Face hub (paper profiles): models and the paper's adapters.

Fails at once, with what to do, when the hub cannot be used: HF_HUB_OFFLINE set, no token for the
gated LLaMA repositories, or the hub unreachable.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse


class HubDownloadError(RuntimeError):
    """A hub download that cannot happen here."""


def hub_offline_reason(timeout: float = 5.0) -> str | None:
    """Why the hub cannot be used right now (HF_HUB_OFFLINE set, endpoint unreachable), or None.
    A quick connection test, so that offline machines fail at once instead of retrying."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}:{port} is unreachable ({err})"
    return None


def _token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def download(repo_id: str, local_dir: str | Path, *, revision: str = "main",
             allow_patterns: Sequence[str] | None = None, what: str = "files") -> Path:
    """snapshot_download of `repo_id` into `local_dir` (a plain folder), with clear errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    advice = ("run this stage on a machine with Hugging Face hub access and a token in HF_TOKEN "
              "(accept the model licence on huggingface.co first), or use the offline default profile "
              "(model=smollm2_135m)")
    token = _token()
    if token is None:
        raise HubDownloadError(f"cannot download {what} from {repo_id}: no Hugging Face token "
                               f"(set HF_TOKEN); {advice}")
    reason = hub_offline_reason()
    if reason is not None:
        raise HubDownloadError(f"cannot download {what} from {repo_id}: {reason}; {advice}")
    try:
        path = snapshot_download(repo_id, revision=revision, local_dir=str(local_dir), token=token,
                                 allow_patterns=list(allow_patterns) if allow_patterns else None,
                                 etag_timeout=10)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise HubDownloadError(f"cannot download {what} from {repo_id}@{revision}: "
                               f"{type(err).__name__}: {err}; {advice}") from err
    return Path(path)
