"""Pushing an export folder to a Hugging Face model repo with `huggingface_hub.HfApi`.

`create_repo` (private unless the user chose public; an existing repo of theirs is reused) and one
`upload_folder`. Which token is used is decided by `choose_token` alone: in public mode only the
visitor's own OAuth token (the Space's HF_TOKEN is never looked at); locally a typed token, else
whatever huggingface_hub finds (HF_TOKEN, `hf auth login`). Hub failures become errors in the
page's language: not signed in, no write access, bad repo name, network down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import ConfigError, PolicyError, RuozhiError, first_line

HUB_URL = "https://huggingface.co"


def choose_token(public: bool, oauth_token: str | None, typed: str | None = None) -> str | None:
    """The token a push uses; None locally means "huggingface_hub's own login"."""
    if public:
        if not oauth_token:
            raise PolicyError(key="err.export.sign_in")
        return oauth_token
    return (typed or "").strip() or None


def check_repo_id(repo_id: str) -> str:
    """`owner/name` as the Hub accepts it, or ConfigError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = (repo_id or "").strip()
    try:
        if repo_id.count("/") != 1:
            raise HFValidationError(repo_id)
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(key="err.export.repo_id", repo_id=repo_id[:100]) from None
    return repo_id


def hub_error(e: Exception, repo_id: str) -> RuozhiError:
    """What a failed Hub call means for the user."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status == 401:
        return PolicyError(key="err.export.unauthorized")
    if isinstance(e, HfHubHTTPError) and status == 403:
        return PolicyError(key="err.export.forbidden", repo_id=repo_id)
    if isinstance(e, (httpx.TransportError, ConnectionError, TimeoutError)):
        return RuozhiError(key="err.export.network", cause=first_line(e))
    return RuozhiError(key="err.export.hub", cause=first_line(e))


def push_folder(folder: Path, repo_id: str, private: bool, token: str | None, api_factory: Callable | None = None,
                stage: Callable[[str], None] = lambda key: None) -> str:
    """Create (or reuse) `repo_id` and upload `folder` to it in one commit; the repo's URL."""
    repo_id = check_repo_id(repo_id)
    if api_factory is None:
        from huggingface_hub import HfApi as api_factory
    api = api_factory(token=token)
    try:
        stage("export.stage_repo")
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        stage("export.stage_upload")
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                          commit_message="Upload fine-tuned model from ruozhi-sft studio")
    except RuozhiError:
        raise
    except Exception as e:  # every Hub client failure is reported in the page's words
        raise hub_error(e, repo_id) from None
    return str(url) if url else f"{HUB_URL}/{repo_id}"
