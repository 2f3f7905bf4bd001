"""Model folders (``model.safetensors`` + ``config.json`` model card) and resumable training state.

Everything here is generic: state dicts of tensors and JSON-ready dicts; the model classes are built elsewhere
from ``card["model"]``. Weights are never unpickled: tensors go through safetensors, and the only pickle-based
file (the optimizer / training state) is read with ``torch.load(weights_only=True)``.

Layouts (see ``weights/README.md``)::

    <model folder>/model.safetensors   the inference weights (EMA weights when training kept them)
    <model folder>/config.json         the model card, including the sha256 of model.safetensors

    <state folder>/LATEST              name of the newest complete checkpoint below (atomically replaced)
    <state folder>/ckpt-XXXX/          model.safetensors, ema.safetensors (optional), training.pt
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import pickle
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from phmdiff_cli import __version__
from phmdiff_cli.engine.hub import CARD_FILE, WEIGHTS_FILE
from phmdiff_cli.errors import InputError
from phmdiff_cli.io.atomic import atomic_path, share_permissions
from phmdiff_cli.modalities import MODALITIES

__all__ = ["FORMAT", "FORMAT_VERSION", "WEIGHTS_FILE", "CARD_FILE", "CARD_KEYS", "TrainingState",
           "INT8_SCALE", "clean_state_dict", "quantize_int8", "dequantize", "sha256_file",
           "model_files", "read_card", "save_model", "load_model",
           "describe_model", "save_training_state", "load_training_state"]

FORMAT = "phmdiff-model"
#: Bump when a reader of the old format would misread the new one; older readers then refuse newer cards.
FORMAT_VERSION = 1
#: Keys every model card has, with their JSON types; "training", "metrics", "modalities" are optional.
CARD_KEYS: dict[str, type] = {"format": str, "format_version": int, "model": dict, "pairs": list,
                              "grid": dict, "normalisation": dict, "sha256": str}
#: Key suffix of the per-row float32 scales of a tensor stored as int8 (:func:`quantize_int8`).
INT8_SCALE = ".int8_scale"
_POINTER = "LATEST"
_EMA_FILE = "ema.safetensors"
_TRAINING_FILE = "training.pt"


#####################################################################################################
# State dicts and hashes
#####################################################################################################

def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy fit for safetensors: keys without the DDP ``module.`` prefix or torch.compile ``_orig_mod.``
    parts, tensors detached, on the CPU and contiguous; tensors sharing memory (tied weights) are cloned,
    since safetensors refuses shared storage.

    Raises:
        ValueError: two keys become the same after stripping.
    """
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, tensor in state_dict.items():
        parts = [p for p in key.split(".") if p != "_orig_mod"]
        while parts and parts[0] == "module":
            parts = parts[1:]
        name = ".".join(parts)
        if name in out:
            raise ValueError(f"state dict keys collide after stripping prefixes: {key!r} -> {name!r}")
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in storages:
            t = t.clone()
        storages.add(storage)
        out[name] = t
    return out


def quantize_int8(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices and convolution kernels (floating tensors of 2 or more dimensions) as symmetric int8 with one
    float32 scale per output row (key + :data:`INT8_SCALE`, shape ``(rows,)``); other tensors unchanged.
    Rounding error per weight: at most half a scale step, ``max|row| / 254``."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point() or tensor.dim() < 2:
            out[name] = tensor
            continue
        rows = tensor.detach().float().reshape(tensor.shape[0], -1)
        scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        out[name] = torch.round(rows / scale[:, None]).to(torch.int8).reshape(tensor.shape)
        out[name + INT8_SCALE] = scale
    return out


def dequantize(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`quantize_int8`: float32 tensors in place of int8 ones with their scales (a
    state dict without scales is returned as it is)."""
    out = {k: v for k, v in tensors.items() if not k.endswith(INT8_SCALE)}
    for key, scale in tensors.items():
        if key.endswith(INT8_SCALE):
            name = key[: -len(INT8_SCALE)]
            q = out[name]
            out[name] = q.float() * scale.float().reshape(-1, *([1] * (q.dim() - 1)))
    return out


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#####################################################################################################
# Model cards
#####################################################################################################

def _pair_problem(pair: Any) -> str | None:
    """Why ``pair`` is not ``[source, target]`` (source: a modality or a list of them), or None."""
    if not isinstance(pair, list) or len(pair) != 2:
        return f"pair {pair!r} is not [source, target]"
    sources = pair[0] if isinstance(pair[0], list) else [pair[0]]
    unknown = [m for m in [*sources, pair[1]] if not isinstance(m, str) or m not in MODALITIES]
    return f"pair {pair!r} names unknown modalities {unknown}" if unknown else None


def _card_problems(card: Mapping[str, Any]) -> list[str]:
    """What is wrong with a model card (empty when it is valid)."""
    problems = [f"missing or not a {kind.__name__}: {key!r}" for key, kind in CARD_KEYS.items()
                if not isinstance(card.get(key), kind)]
    if problems:
        return problems
    if card["format"] != FORMAT:
        return [f"format is {card['format']!r}, not {FORMAT!r}"]
    if not 1 <= card["format_version"] <= FORMAT_VERSION:
        return [f"format_version {card['format_version']} is not one this phmdiff reads ({FORMAT_VERSION})"]
    if not card["pairs"]:
        return ["pairs is empty"]
    return [p for p in map(_pair_problem, card["pairs"]) if p]


def model_files(path: str | Path) -> tuple[Path, Path]:
    """``(weights, card)`` paths of a model given as its folder or its ``.safetensors`` file (card beside it).

    Raises:
        InputError: the path is neither, or a file is missing.
    """
    p = Path(path)
    if p.is_dir():
        weights = p / WEIGHTS_FILE
    elif p.suffix == ".safetensors":
        weights = p
    else:
        raise InputError("not a model: expected a folder with model.safetensors + config.json, or a "
                         ".safetensors file with config.json beside it", path=p)
    card = weights.with_name(CARD_FILE)
    for f in (weights, card):
        if not f.is_file():
            raise InputError("model file missing", path=f,
                             hint=f"a model is {WEIGHTS_FILE} + {CARD_FILE} in one folder")
    return weights, card


def read_card(path: str | Path) -> dict[str, Any]:
    """The validated model card of a model folder or ``.safetensors`` file (weights not read or verified).

    Raises:
        InputError: files missing, config.json not JSON, or the card invalid.
    """
    _, card_path = model_files(path)
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"unreadable model card: {error}", path=card_path) from None
    if isinstance(card, dict) and isinstance(card.get("format_version"), int) \
            and card["format_version"] > FORMAT_VERSION:
        raise InputError(f"model card format_version {card['format_version']} is newer than this phmdiff "
                         f"reads ({FORMAT_VERSION})", path=card_path, hint="upgrade phmdiff")
    problems = _card_problems(card) if isinstance(card, dict) else ["not a JSON object"]
    if problems:
        raise InputError(f"invalid model card: {'; '.join(problems)}", path=card_path,
                         hint="re-export or re-download the model")
    return card


#####################################################################################################
# Model folders
#####################################################################################################

def save_model(folder: str | Path, state_dict: Mapping[str, torch.Tensor], card: Mapping[str, Any], *,
               force: bool = False) -> Path:
    """Write a model folder atomically: readers see the old folder, no folder, or the complete new one.

    Args:
        folder: the model folder to create.
        state_dict: tensors (see :func:`clean_state_dict` for what is normalised).
        card: the model card without the bookkeeping keys: "model" (model config dict), "pairs"
            ([[source, target], ...] with canonical modality names), "grid", "normalisation", and
            optionally "modalities", "training", "metrics". "format", "format_version", "sha256",
            "phmdiff_version" and "created" are filled in.
        force: replace an existing folder.

    Raises:
        InputError: the folder exists without ``force``, or its parent is missing or not writable.
        ValueError: the card is invalid (a programming error, not a user's).
    """
    full = {**card, "format": FORMAT, "format_version": FORMAT_VERSION, "sha256": "",
            "phmdiff_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    problems = _card_problems(full)
    if problems:
        raise ValueError(f"invalid model card: {'; '.join(problems)}")
    tensors = clean_state_dict(state_dict)
    with atomic_path(folder, force=force, directory=True) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        full["sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        (tmp / CARD_FILE).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        share_permissions(tmp / WEIGHTS_FILE)
    return Path(folder)


def load_model(path: str | Path, *,
               device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a model folder (or its ``.safetensors`` file) after checking the card and the sha256.

    Returns:
        ``(state_dict, card)``, tensors on ``device``; tensors stored as int8 (:func:`quantize_int8`) come
        back as float32.

    Raises:
        InputError: a file is missing or corrupt, the card is invalid, or the weights do not match its sha256.
    """
    card = read_card(path)
    weights, _ = model_files(path)
    actual = sha256_file(weights)
    if actual != card["sha256"].lower():
        raise InputError(f"sha256 mismatch: the file has {actual[:12]}..., config.json says "
                         f"{card['sha256'][:12]}...", path=weights,
                         hint="the file is corrupt or was replaced: download or copy the model again")
    return _load_tensors(weights, device), card


def describe_model(path: str | Path) -> dict[str, Any]:
    """Summary of a model for listings, from its card and the safetensors header (weights not read).

    Returns:
        JSON-ready dict: path, pairs, modalities, grid, params (number of weights), file_bytes, sha256,
        metrics, created.
    """
    card = read_card(path)
    weights, _ = model_files(path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(INT8_SCALE))
    except (SafetensorError, OSError) as error:
        raise InputError(f"not a valid safetensors file: {error}", path=weights) from None
    return {"path": str(weights.parent), "pairs": card["pairs"], "modalities": card.get("modalities"),
            "grid": card["grid"], "params": params, "file_bytes": weights.stat().st_size,
            "sha256": card["sha256"], "metrics": card.get("metrics", {}), "created": card.get("created")}


def _load_tensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(path, device=str(device))
    except (SafetensorError, OSError) as error:
        raise InputError(f"not a valid safetensors file: {error}", path=path) from None
    try:
        return dequantize(tensors)
    except (KeyError, RuntimeError) as error:
        raise InputError(f"int8 scales without their weights or of the wrong size: {error}", path=path) from None


#####################################################################################################
# Training state (resume)
#####################################################################################################

@dataclass
class TrainingState:
    """What :func:`load_training_state` returns.

    Attributes:
        model: the raw (non-EMA) weights.
        ema: the EMA weights, if saved.
        optimizer_state: the optimizer's ``state_dict()``, tensors on the CPU.
        extra: step, lr-schedule state, RNG states (as tensors), data-sampler state, as saved.
        path: the checkpoint folder that was read.
    """

    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any]
    extra: dict[str, Any]
    path: Path


#: What ``torch.load(weights_only=True)`` reads back; anything else would fail only at resume time.
_PLAIN_LEAVES = (torch.Tensor, bool, int, float, str, type(None))
_PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple)


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError when ``obj`` holds something other than tensors, numbers, strings, None, dicts,
    lists and tuples (e.g. a NumPy array: convert RNG states with ``torch.from_numpy``)."""
    if isinstance(obj, _PLAIN_LEAVES):
        return
    if type(obj) not in _PLAIN_CONTAINERS:
        raise TypeError(f"{where} is a {type(obj).__name__}, which torch.load(weights_only=True) refuses")
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in items:
        _check_plain(value, f"{where}[{key!r}]")


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a power cut after the pointer flip cannot lose the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pointer(root: Path, name: str) -> None:
    """Atomically replace ``root/LATEST`` with ``name``: the commit point of a training checkpoint."""
    fd, tmp = tempfile.mkstemp(prefix=f".{_POINTER}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / _POINTER)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(root)


def save_training_state(folder: str | Path, *, model: Mapping[str, torch.Tensor],
                        ema: Mapping[str, torch.Tensor] | None, optimizer_state: dict[str, Any],
                        extra: dict[str, Any], force: bool = True) -> Path:
    """Write a resumable checkpoint into ``folder``; a kill at any moment leaves the previous complete
    checkpoint or the new complete one.

    The files go into a new ``ckpt-XXXX/`` folder; ``LATEST`` is then atomically replaced to name it (the
    commit); only then are older ``ckpt-*`` folders (and leftovers of interrupted saves) deleted.

    Args:
        folder: the state folder (created if missing).
        model, ema: state dicts (cleaned as by :func:`clean_state_dict`); ``ema`` may be None.
        optimizer_state: ``optimizer.state_dict()``.
        extra: step, lr-schedule state, RNG states as tensors, data-sampler state; only tensors, numbers,
            strings, None, dicts, lists and tuples.
        force: replace an existing checkpoint (the trainer's default); False refuses.

    Returns:
        The new checkpoint folder.

    Raises:
        InputError: a checkpoint exists and ``force`` is False.
        TypeError: ``optimizer_state`` or ``extra`` holds a type that ``weights_only`` loading refuses.
    """
    root = Path(folder)
    if not force and (root / _POINTER).exists():
        raise InputError("a training checkpoint already exists", path=root, hint="resume it or pass --force")
    _check_plain(optimizer_state, "optimizer_state")
    _check_plain(extra, "extra")
    root.mkdir(parents=True, exist_ok=True)
    ckpt = Path(tempfile.mkdtemp(prefix="ckpt-", dir=root))
    try:
        save_file(clean_state_dict(model), ckpt / WEIGHTS_FILE, metadata={"format": "pt"})
        if ema is not None:
            save_file(clean_state_dict(ema), ckpt / _EMA_FILE, metadata={"format": "pt"})
        torch.save({"optimizer": optimizer_state, "extra": extra}, ckpt / _TRAINING_FILE)
        for f in [*ckpt.iterdir(), ckpt]:
            share_permissions(f)
            _fsync(f)
        _write_pointer(root, ckpt.name)
    except BaseException:
        shutil.rmtree(ckpt, ignore_errors=True)
        raise
    for old in root.glob("ckpt-*"):
        if old != ckpt:
            shutil.rmtree(old, ignore_errors=True)
    return ckpt


def load_training_state(folder: str | Path, *, device: str | torch.device = "cpu") -> TrainingState:
    """Read the checkpoint that ``folder/LATEST`` names (tensors on ``device``, optimizer state on the CPU).

    Raises:
        InputError: no checkpoint in ``folder``, or it is incomplete or corrupt.
    """
    root = Path(folder)
    try:
        name = (root / _POINTER).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise InputError("no training checkpoint here", path=root,
                         hint="start a new run instead of resuming") from None
    ckpt = root / name
    if not name.startswith("ckpt-") or "/" in name or not (ckpt / _TRAINING_FILE).is_file():
        raise InputError(f"training checkpoint {name!r} is missing or incomplete", path=root / _POINTER)
    try:
        training = torch.load(ckpt / _TRAINING_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"unreadable training state: {first}", path=ckpt / _TRAINING_FILE) from None
    if not isinstance(training, dict) or not {"optimizer", "extra"} <= training.keys():
        raise InputError("training state lacks 'optimizer' or 'extra'", path=ckpt / _TRAINING_FILE)
    ema = _load_tensors(ckpt / _EMA_FILE, device) if (ckpt / _EMA_FILE).is_file() else None
    return TrainingState(model=_load_tensors(ckpt / WEIGHTS_FILE, device), ema=ema,
                         optimizer_state=training["optimizer"], extra=training["extra"], path=ckpt)
