"""Hub ids such as `facebook/layerskip-llama3.2-1B`, resolved to a local snapshot folder by huggingface_hub.

Online it downloads what is missing; offline (no network, or HF_HUB_OFFLINE=1) it uses the local
hub cache ($HF_HUB_CACHE, else $HF_HOME/hub) and otherwise says how to get the files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from layerskip.errors import LayerSkipError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Safetensors weights, configs and tokenizer files: never pickled weights.
WANTED_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def looks_like_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_hub_id(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    how_to = (f"download it where the hub is reachable (`hf download {repo_id}`) and copy the hub cache here, "
              "or pass a local checkpoint folder")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=WANTED_FILES, local_files_only=_offline(),
                                      cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        raise LayerSkipError(f"model '{repo_id}' is not in the local hub cache and the hub cannot be reached: {how_to}") from None
    except GatedRepoError:
        raise LayerSkipError(f"model '{repo_id}' is gated: accept its licence on the hub and log in (`hf auth login`)") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise LayerSkipError(f"unknown model '{repo_id}': no such local path or hub repository") from None
    except (HfHubHTTPError, OSError) as error:
        raise LayerSkipError(f"cannot fetch model '{repo_id}' ({type(error).__name__}): {how_to}") from None
