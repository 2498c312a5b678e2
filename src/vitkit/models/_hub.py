"""Hugging Face hub ids wherever a checkpoint path is taken: ``hf-hub:org/name`` (optionally ``@revision``).

The id is resolved by ``huggingface_hub.snapshot_download`` into the local cache (``HF_HOME`` / ``HF_HUB_CACHE``),
so ``HF_HUB_OFFLINE=1`` serves a cached snapshot without any network; an id that is neither cached nor reachable
is one error line naming it. Only weight, config, tokenizer and processor files are fetched: never pickled code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError
from ..utils import require_extra

HUB_PREFIX = "hf-hub:"
# what a checkpoint needs; pickled weights (*.bin, *.pth) are fetched too but only ever read with weights_only=True
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.bin", "*.pth", "*.pt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


def is_hub_id(spec: str | os.PathLike) -> bool:
    return isinstance(spec, str) and spec.startswith(HUB_PREFIX)


def parse_hub_id(spec: str) -> tuple[str, str | None]:
    """``hf-hub:org/name@rev`` -> (``org/name``, ``rev``); a malformed id is a CheckpointError naming it."""
    body = spec[len(HUB_PREFIX):]
    repo_id, _, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or ".." in repo_id or (revision == "" and "@" in body):
        raise CheckpointError(f"{spec!r} is not a hub id; expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo_id, revision or None


def hub_cache_dir() -> str | None:
    """The cache folder the environment names now (``HF_HUB_CACHE``, else ``HF_HOME``/hub); None: the library's
    default. Read at each call: huggingface_hub reads these once, at import."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def local_checkpoint(spec: str | os.PathLike) -> Path:
    """A local path as given, or the cached snapshot folder of a hub id (downloaded first when online)."""
    if not is_hub_id(spec):
        return Path(spec)
    repo_id, revision = parse_hub_id(str(spec))
    hub = require_extra("huggingface_hub", "hub", f"loading {spec}")
    errors = hub.errors
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        folder = hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                       local_files_only=offline, cache_dir=hub_cache_dir())
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
        cache = hub_cache_dir() or "~/.cache/huggingface/hub"
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub cannot be reached ({type(e).__name__})"
        raise CheckpointError(f"{spec}: not in the local Hugging Face cache ({cache}) and {why}; download it "
                              f"where there is network (`hf download {repo_id}`) or pass a local folder") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError) as e:
        raise CheckpointError(f"{spec}: {type(e).__name__} on the hub (private, gated, or misspelt?)") from None
    except errors.HfHubHTTPError as e:
        raise CheckpointError(f"{spec}: the hub answered {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return Path(folder)
