"""Dictionary locations: a local directory, or a Hugging Face repo id with an optional subfolder.

``google/gemma-scope-2-270m-pt/transcoder_all`` (or ``hf://google/gemma-scope-2-270m-pt/transcoder_all``)
downloads only that subfolder into the Hugging Face cache and returns its local path; with Gemma Scope 2
selectors (``width``, ``l0``, ``affine``) only the chosen variant's layer folders. When the hub cannot be
reached the error says so and names the way round it.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from .errors import CircuitscopeError
from .formats.gemma_scope_2 import AFFINE, L0, TRANSCODER_DIR, WIDTH, width_token

HF_PREFIX = "hf://"


def parse_hub_spec(spec: str) -> tuple[str, str | None] | None:
    """``owner/repo[/sub/folder]`` -> (repo_id, subfolder or None); None when ``spec`` is not of that form."""
    body = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2 or spec.startswith((".", "/", "~")) or any(p in (".", "..") for p in parts):
        return None
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def resolve_dictionary_path(spec: str | Path, **selectors: Any) -> Path:
    """A local directory for ``spec``: the path itself when it exists, else a hub download (of the variant the
    ``selectors`` of ``load_dictionaries`` choose, when any is given: see :func:`hub_patterns`)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    parsed = parse_hub_spec(str(spec))
    if parsed is None:
        raise CircuitscopeError(
            f"{spec}: no such file or directory; pass a dictionary directory or a hub id such as "
            "google/gemma-scope-2-270m-pt/transcoder_all"
        )
    return download_from_hub(*parsed, **selectors)


def hub_patterns(subfolder: str | None, **selectors: Any) -> tuple[list[str] | None, list[str] | None]:
    """The ``allow_patterns`` and ``ignore_patterns`` (fnmatch, as ``snapshot_download`` and
    ``huggingface-cli download --include/--exclude`` read them) that fetch ``subfolder`` (None: everything),
    or with Gemma Scope 2 selectors (``width``, ``l0``, ``affine``) only the layer folders
    ``layer_{L}_width_{W}_l0_{X}[_affine]`` they choose, in ``subfolder`` or its ``transcoder_all/``. Every
    layer is kept: the loader picks one folder per layer. Selectors of other formats fetch the whole subfolder."""
    base = f"{subfolder}/" if subfolder else ""
    given = {k: v for k, v in selectors.items() if v is not None}
    if not given or not set(given) <= {WIDTH.name, L0.name, AFFINE.name}:
        return ([f"{base}*"] if subfolder else None), None
    width, l0, affine = (given.get(s.name) for s in (WIDTH, L0, AFFINE))
    width = width_token(width) if isinstance(width, int) else width
    name = "layer_*_width_{}_l0_{}".format(*("*" if v is None else glob.escape(str(v)) for v in (width, l0)))
    suffixes = {None: ("", "_affine"), True: ("_affine",), False: ("",)}[affine]
    roots = [base] + ([] if Path(base).name == TRANSCODER_DIR else [f"{base}{TRANSCODER_DIR}/"])
    allow = [f"{root}{name}{suffix}/*" for root in roots for suffix in suffixes]
    # with l0 left open, `l0_*` also matches `l0_small_affine`: --no-affine must leave those out
    ignore = [f"{root}layer_*_affine/*" for root in roots] if affine is False else None
    return allow, ignore


def download_from_hub(repo_id: str, subfolder: str | None, **selectors: Any) -> Path:
    """Download ``subfolder`` (or the whole repo) of ``repo_id``, only the chosen variant when selectors are
    given (:func:`hub_patterns`); clear CircuitscopeError on failure."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        raise CircuitscopeError("downloading from the hub needs huggingface_hub: pip install huggingface_hub") from None
    where = repo_id + (f" (subfolder {subfolder})" if subfolder else "")
    chosen = ", ".join(f"{k}={v!r}" for k, v in selectors.items() if v is not None)
    allow, ignore = hub_patterns(subfolder, **selectors)
    try:
        local = snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=ignore)
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
            + "".join(f" --include '{p}'" for p in allow or ())
            + "".join(f" --exclude '{p}'" for p in ignore or ())
            + ") and pass the local directory instead"
        ) from None
    result = Path(local) / subfolder if subfolder else Path(local)
    if not result.exists():
        if chosen:
            raise CircuitscopeError(f"{where}: no layer folder of the repository matches {chosen}; check the path, "
                                    "and the selectors against its folder names (layer_{L}_width_{W}_l0_{X}[_affine])")
        raise CircuitscopeError(f"{where}: the repository has no folder {subfolder!r}; check the path")
    return result
