"""Dictionary locations: a local directory, or a Hugging Face repo id with an optional subfolder.

``google/gemma-scope-2-270m-pt/transcoder_all`` (or ``hf://google/gemma-scope-2-270m-pt/transcoder_all``)
downloads only that subfolder into the Hugging Face cache and returns its local path. When the hub
cannot be reached the error says so and names the way round it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CircuitscopeError

HF_PREFIX = "hf://"


def parse_hub_spec(spec: str) -> tuple[str, str | None] | None:
    """``owner/repo[/sub/folder]`` -> (repo_id, subfolder or None); None when ``spec`` is not of that form."""
    body = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2 or spec.startswith((".", "/", "~")) or any(p in (".", "..") for p in parts):
        return None
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def resolve_dictionary_path(spec: str | Path) -> Path:
    """A local directory for ``spec``: the path itself when it exists, else a hub download."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    parsed = parse_hub_spec(str(spec))
    if parsed is None:
        raise CircuitscopeError(
            f"{spec}: no such file or directory; pass a dictionary directory or a hub id such as "
            "google/gemma-scope-2-270m-pt/transcoder_all"
        )
    return download_from_hub(*parsed)


def download_from_hub(repo_id: str, subfolder: str | None) -> Path:
    """Download ``subfolder`` (or the whole repo) of ``repo_id``; clear CircuitscopeError on failure."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        raise CircuitscopeError("downloading from the hub needs huggingface_hub: pip install huggingface_hub") from None
    where = repo_id + (f" (subfolder {subfolder})" if subfolder else "")
    try:
        local = snapshot_download(repo_id, allow_patterns=[f"{subfolder}/**"] if subfolder else None)
    except GatedRepoError:
        raise CircuitscopeError(
            f"{where}: the repository is gated; accept its licence on huggingface.co and log in with "
            "`huggingface-cli login`, or download it elsewhere and pass the local directory"
        ) from None
    except RepositoryNotFoundError:
        raise CircuitscopeError(f"{where}: no such repository on the Hugging Face hub; check the id") from None
    except (OSError, ValueError) as exc:
        raise CircuitscopeError(
            f"{where}: cannot reach the Hugging Face hub ({type(exc).__name__}). Download it on a machine "
            f"with access (huggingface-cli download {repo_id}"
            + (f" --include '{subfolder}/*'" if subfolder else "")
            + ") and pass the local directory instead"
        ) from None
    result = Path(local) / subfolder if subfolder else Path(local)
    if not result.exists():
        raise CircuitscopeError(f"{where}: the repository has no folder {subfolder!r}; check the path")
    return result
