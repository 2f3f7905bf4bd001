"""Where ``--model`` points: a local folder or file, a run folder, a shipped name, or ``hf://org/repo[@revision]``.

Named models are folders under ``$PHMDIFF_WEIGHTS`` (several folders separated by ``os.pathsep``; they win
over the shipped ones) and under the repository's ``weights/`` folder, beside the ``phmdiff_cli`` package.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from phmdiff_cli.errors import InputError

__all__ = ["WEIGHTS_FILE", "CARD_FILE", "DEFAULT_MODEL", "HEADS_MODEL", "HF_SCHEME", "WEIGHTS_ENV", "SHIPPED_WEIGHTS",
           "RUN_SUBFOLDERS", "weights_dirs", "available_models", "resolve_model"]

#: A model folder holds these two files (this module imports no torch, so the CLI starts fast).
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "config.json"
#: The model ``--model`` defaults to: the shipped ``weights/brain-sharp/`` (``brain-small``, the earlier default,
#: stays available by name).
DEFAULT_MODEL = "brain-sharp"
#: The model ``phmdiff synthesize`` without ``--model`` gives the cases whose source shows a head with skull (and
#: that come without ``--brain-mask``): the shipped ``weights/brain-heads/``, brain-sharp fine-tuned on heads too.
HEADS_MODEL = "brain-heads"
HF_SCHEME = "hf://"
WEIGHTS_ENV = "PHMDIFF_WEIGHTS"
#: ``weights/`` of the repository (an editable install or a source checkout).
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
#: A run folder (from ``phmdiff train --out``) resolves to the first of these model folders it holds.
RUN_SUBFOLDERS = ("best", "last")
#: ``hf://org/repo[/sub/folder][@revision]``
_HF_SPEC = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?P<sub>(?:/[\w.-]+)*)/?(?:@(?P<revision>.+))?")
_PATH_HINT = "pass a model folder, a .safetensors file or hf://org/repo"
_TRAIN_HINT = ("train one with `phmdiff train --data DIR --pairs t1n:t2w --out runs/brain` and pass "
               "--model runs/brain")


def weights_dirs() -> list[Path]:
    """Folders searched for named models, first ``$PHMDIFF_WEIGHTS`` entries, then ``weights/``."""
    env = [Path(p).expanduser() for p in os.environ.get(WEIGHTS_ENV, "").split(os.pathsep) if p]
    return [d for d in [*env, SHIPPED_WEIGHTS] if d.is_dir()]


def available_models() -> dict[str, Path]:
    """Named models: ``{name: folder}`` for every sub-folder holding a ``model.safetensors``; the first
    folder of :func:`weights_dirs` wins on a name clash."""
    found: dict[str, Path] = {}
    for root in weights_dirs():
        for folder in sorted(root.iterdir()):
            if (folder / WEIGHTS_FILE).is_file():
                found.setdefault(folder.name, folder)
    return found


def _local(path: Path) -> Path:
    """A model folder, a ``.safetensors`` file, or a run folder's best/last model."""
    if path.is_file() or (path / WEIGHTS_FILE).is_file():
        return path
    for sub in RUN_SUBFOLDERS:
        if (path / sub / WEIGHTS_FILE).is_file():
            return path / sub
    raise InputError(f"no {WEIGHTS_FILE} in this folder (nor in {' or '.join(RUN_SUBFOLDERS)}/)", path=path,
                     hint=f"a model is {WEIGHTS_FILE} + {CARD_FILE} in one folder")


def _offline() -> bool:
    """``HF_HUB_OFFLINE``, read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _from_hub(spec: str, *, local_files_only: bool) -> Path:
    """Download (or find in the Hugging Face cache) the model files of ``hf://org/repo[/sub][@revision]``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    match = _HF_SPEC.fullmatch(spec[len(HF_SCHEME):])
    if not match:
        raise InputError(f"bad Hugging Face model {spec!r}", hint="write hf://org/repo or hf://org/repo@revision")
    repo, revision = match["repo"], match["revision"]
    sub = match["sub"].strip("/")
    prefix = f"{sub}/" if sub else ""
    offline = local_files_only or _offline()
    try:
        snapshot = snapshot_download(repo, revision=revision, local_files_only=offline,
                                     allow_patterns=[prefix + WEIGHTS_FILE, prefix + CARD_FILE])
    except LocalEntryNotFoundError:
        why = "offline (HF_HUB_OFFLINE is set)" if _offline() else \
            "offline (local_files_only)" if local_files_only else "the Hugging Face Hub could not be reached"
        raise InputError(f"{spec}: not in the local Hugging Face cache and {why}",
                         hint="connect to the network and unset HF_HUB_OFFLINE, or download it once with "
                              f"`hf download {repo}`; behind a proxy set HTTPS_PROXY") from None
    except GatedRepoError:
        raise InputError(f"{spec}: gated repository",
                         hint="accept its conditions on huggingface.co and log in with `hf auth login` "
                              "(or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise InputError(f"{spec}: repository not found on the Hugging Face Hub",
                         hint="check the name; for a private repository log in with `hf auth login`",
                         ) from None
    except RevisionNotFoundError:
        raise InputError(f"{spec}: revision {revision!r} not found in {repo}") from None
    except Exception as error:  # noqa: BLE001 - network failures come as many types (proxy, TLS, timeouts)
        raise InputError(f"{spec}: download failed: {type(error).__name__}: {error}",
                         hint="check the network, HTTPS_PROXY and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to "
                              "use the cache only") from None
    folder = Path(snapshot) / sub
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CARD_FILE).is_file():
        raise InputError(f"{spec}: the repository has no {WEIGHTS_FILE} + {CARD_FILE}", path=folder)
    return folder


def resolve_model(spec: str, *, local_files_only: bool = False) -> Path:
    """The model folder (or ``.safetensors`` file) that ``--model spec`` names; pass it to ``load_model``.

    Args:
        spec: ``hf://org/repo[/sub/folder][@revision]``, a path (model folder, ``.safetensors`` file with
            ``config.json`` beside it, or a run folder holding ``best/`` or ``last/``), or a name from
            :func:`available_models` (e.g. :data:`DEFAULT_MODEL`).
        local_files_only: for ``hf://``: use the Hugging Face cache only (as when ``HF_HUB_OFFLINE`` is set).

    Raises:
        InputError: nothing matches (the message lists the available names), or the download failed.
    """
    if spec.startswith(HF_SCHEME):
        return _from_hub(spec, local_files_only=local_files_only)
    path = Path(spec).expanduser()
    if path.exists():
        return _local(path.resolve())
    models = available_models()
    if spec in models:
        return models[spec]
    if not models:
        what = "the shipped default model is missing from this copy of phmdiff" if spec == DEFAULT_MODEL else \
            f"model {spec!r} not found, and no model is installed"
        raise InputError(what, hint=f"{_TRAIN_HINT}, or {_PATH_HINT}")
    raise InputError(f"model {spec!r} not found: not a file or folder, nor a known name",
                     hint=f"available: {', '.join(models)}; or {_PATH_HINT}")
