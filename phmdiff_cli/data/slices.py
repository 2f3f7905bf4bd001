"""2.5D training slices: modality pairs, the source stack, foreground-weighted sampling, augmentation, splits.

A sample is one axial target slice and, for each source modality, the same slice with its ``k`` neighbours on
each side (the 2.5D context; at the volume border the edge slice is repeated). :func:`source_stack` builds
that context for training and for synthesis alike, so both see the same input.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from phmdiff_cli.data.cache import CachedSubject, cache_subject
from phmdiff_cli.data.grid import ModelGrid
from phmdiff_cli.data.layouts import Subject
from phmdiff_cli.data.normalize import normalize_source
from phmdiff_cli.data.preprocess import shows_skull
from phmdiff_cli.errors import InputError
from phmdiff_cli.modalities import ABSENT_ID, canonical_modality, modality_id

__all__ = [
    "Pair",
    "parse_pairs",
    "context_indices",
    "source_stack",
    "Augment",
    "SliceDataset",
    "SliceSampler",
    "split_subjects",
]

#: Memory maps kept open per process (each holds a file descriptor).
_MAX_OPEN_MAPS = 256
#: Ranked source volumes kept in memory per process (each DataLoader worker has its own): the least recently used
#: go first past this many bytes, so host memory stays bounded however large the dataset (a 240 x 240 x 155
#: volume is 18 MB in float16: 29 of them).
SOURCE_CACHE_BYTES = 512 * 2**20

SampleKey = tuple[int, int, int]
"""``(item, z, augmentation seed)``: which (subject, pair), which slice, and the seed of its augmentation."""


class Pair(NamedTuple):
    """Source modalities -> target modality (canonical names)."""

    sources: tuple[str, ...]
    target: str

    def __str__(self) -> str:
        return f"{'+'.join(self.sources)}:{self.target}"


def parse_pairs(text: str) -> tuple[Pair, ...]:
    """Parse ``"t1n:t2w,t1:flair,t1n+t2w:t2f"`` into pairs with canonical names (aliases accepted).

    Raises:
        InputError: malformed pair, unknown modality, a target among its sources, or a duplicated pair.
    """
    pairs: list[Pair] = []
    for chunk in (c.strip() for c in text.split(",")):
        left, sep, right = chunk.partition(":")
        if not sep or not left.strip() or not right.strip() or ":" in right:
            raise InputError(
                f"malformed pair {chunk!r}", hint="write SOURCE:TARGET, e.g. t1n:t2w,t1n+t2w:t2f"
            )
        sources = tuple(canonical_modality(s) for s in left.split("+"))
        pair = Pair(sources, canonical_modality(right))
        if pair.target in sources or len(set(sources)) != len(sources):
            raise InputError(f"pair {chunk!r} repeats a modality", hint="a target cannot also be a source")
        if pair in pairs:
            raise InputError(f"pair {chunk!r} is given twice")
        pairs.append(pair)
    return tuple(pairs)


##################################################################################
#                                2.5D context                                    #
##################################################################################


def context_indices(z: int, depth: int, k: int) -> np.ndarray:
    """Slice indices ``z - k .. z + k`` (``2k + 1`` of them); the border slice repeats outside the volume."""
    return np.clip(np.arange(z - k, z + k + 1), 0, depth - 1)


def source_stack(
    volumes: Sequence[np.ndarray],
    modalities: Sequence[str],
    *,
    k: int,
    slots: int,
    z: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The model's source input for some slices of a volume.

    Args:
        volumes: one model-grid array per source, each ``(Z, H, W)`` (model range, any float dtype, memmap).
        modalities: canonical modality of each source.
        k: neighbours on each side (2.5D context).
        slots: source slots ``S`` of the model (>= number of sources); unused slots are zeros.
        z: slice indices; default all ``range(Z)``.

    Returns:
        ``(source, src_mod)``: float32 ``(len(z), S, 2k+1, H, W)`` and int64 ``(S,)`` modality ids
        (:data:`~phmdiff_cli.modalities.ABSENT_ID` for unused slots).
    """
    if not 0 < len(volumes) <= slots or len(volumes) != len(modalities):
        raise ValueError(f"{len(volumes)} sources for {slots} slots and {len(modalities)} modalities")
    depth, height, width = volumes[0].shape
    z = range(depth) if z is None else z
    source = np.zeros((len(z), slots, 2 * k + 1, height, width), dtype=np.float32)
    for n, zi in enumerate(z):
        idx = context_indices(int(zi), depth, k)
        for slot, volume in enumerate(volumes):
            source[n, slot] = volume[idx]
    src_mod = np.full(slots, ABSENT_ID, dtype=np.int64)
    src_mod[: len(modalities)] = [modality_id(m) for m in modalities]
    return source, src_mod


##################################################################################
#                                Augmentation                                    #
##################################################################################


@dataclass(frozen=True)
class Augment:
    """Random augmentation that keeps source and target aligned.

    Attributes:
        flip_lr: probability of a left-right flip (of all images together; never up/down: anatomy has one).
        gamma: intensity gamma drawn log-uniformly in ``[1/(1+gamma), 1+gamma]`` per source modality.
        scale: intensity scale drawn in ``[1-scale, 1+scale]`` per source modality.
        rotate: largest in-plane rotation, degrees (uniform in ``[-rotate, rotate]``; 0: none).
        zoom: largest in-plane zoom, as a fraction (log-uniform in ``[1/(1+zoom), 1+zoom]``; 0: none).
        translate: largest in-plane shift, pixels (uniform in ``[-translate, translate]`` along each axis;
            0: none).

    Rotation, zoom and shift resample the sources and the target with one bilinear affine (MONAI's
    ``Affine``) about the slice centre, background filling what comes in from outside: with few subjects,
    each new pose is anatomy the network has not memorised. Shifts move the brain across the patch grid:
    every training brain otherwise sits where its preprocessing put it. Intensities of the sources only are
    jittered (as a different scanner or normalisation would change them); the target keeps its values, so the
    model learns one output scale.
    """

    flip_lr: float = 0.5
    gamma: float = 0.1
    scale: float = 0.05
    rotate: float = 0.0
    zoom: float = 0.0
    translate: float = 0.0

    def __call__(
        self, source: np.ndarray, target: np.ndarray, n_sources: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augmented copies of ``source`` ``(S, 2k+1, H, W)`` and ``target`` ``(1, H, W)`` (model range);
        ``source`` may be modified."""
        if rng.random() < self.flip_lr:
            source, target = source[..., ::-1], target[..., ::-1]
        if self.rotate > 0 or self.zoom > 0 or self.translate > 0:
            source, target = self._pose(source, target, n_sources, rng)
        for slot in range(n_sources):
            gamma = float(np.exp(rng.uniform(-1.0, 1.0) * np.log1p(self.gamma)))
            scale = float(rng.uniform(1.0 - self.scale, 1.0 + self.scale))
            unit = np.clip((source[slot] + 1.0) * 0.5, 0.0, 1.0)  # [-1, 1] -> [0, 1]: background stays 0
            source[slot] = np.clip(scale * unit**gamma, 0.0, 1.0) * 2.0 - 1.0
        return np.ascontiguousarray(source), np.ascontiguousarray(target)

    def _pose(
        self, source: np.ndarray, target: np.ndarray, n_sources: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """One random rotation, zoom and shift of the used source slots and the target together."""
        from monai.transforms import Affine  # imported on use: MONAI takes seconds to import

        angle = np.deg2rad(rng.uniform(-self.rotate, self.rotate))
        zoom = float(np.exp(rng.uniform(-1.0, 1.0) * np.log1p(self.zoom)))
        shift = rng.uniform(-self.translate, self.translate, size=2)
        used = source[:n_sources]
        # Shifted by +1 so the model range's background (-1) is 0, what the zero padding brings in.
        stack = np.concatenate([used.reshape(-1, *used.shape[-2:]), target]) + 1.0
        moved = Affine(rotate_params=angle, scale_params=(zoom, zoom), translate_params=tuple(shift),
                       padding_mode="zeros", image_only=True)(stack)
        moved = np.asarray(moved, dtype=np.float32) - 1.0
        source = np.array(source, dtype=np.float32)
        source[:n_sources] = moved[:-1].reshape(used.shape)
        return source, moved[-1:]


##################################################################################
#                              Dataset and sampler                               #
##################################################################################


class SliceDataset(torch.utils.data.Dataset):
    """Training slices of (subject, pair) items, preprocessed once into a cache.

    Samples (indexed by :data:`SampleKey`, as drawn by :meth:`sampler`)::

        {"source": (S, 2k+1, H, W) float32, "src_mod": (S,) int64,
         "tgt_mod": () int64, "target": (1, H, W) float32, "skull": () int64}

    (``skull``: 1 where the subject's first source shows a head with skull, :func:`shows_skull`).

    Args:
        subjects: the subjects to use; those lacking all modalities of every pair are listed in ``skipped``.
        pairs: source -> target pairs.
        grid: the model grid (H = W = ``grid.size``).
        cache_dir: the preprocessing cache folder.
        k: 2.5D neighbours on each side.
        slots: source slots S; default the largest number of sources of a pair.
        augment: augmentation, or ``None`` (validation).
        source_norm: how sources are given to the model
            (:func:`~phmdiff_cli.data.normalize.normalize_source`); for ``"rank"`` each source volume is
            transformed once and kept in memory (float16, ~18 MB for a 240 x 240 x 155 volume), up to
            :data:`SOURCE_CACHE_BYTES` per process.
        resample: resample sources on another grid onto the target's instead of refusing.
        background_weight: sampling weight of an empty slice relative to the fullest slice of its volume.
        progress: show a progress bar (stderr) while preprocessing.

    Raises:
        InputError: a pair has no subject with all its modalities, grids differ, or as the cache.
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        pairs: Sequence[Pair],
        grid: ModelGrid,
        cache_dir: Path,
        *,
        k: int = 1,
        slots: int | None = None,
        augment: Augment | None = None,
        source_norm: str = "percentile",
        resample: bool = False,
        background_weight: float = 0.02,
        progress: bool = False,
    ) -> None:
        self.pairs = tuple(pairs)
        self.grid, self.k, self.augment, self.source_norm = grid, k, augment, source_norm
        self.slots = slots or max(len(p.sources) for p in self.pairs)
        self.background_weight = background_weight
        usable = {
            s.id: [p for p in self.pairs if set(p.sources) | {p.target} <= set(s.images)] for s in subjects
        }
        for pair in self.pairs:
            if not any(pair in found for found in usable.values()):
                raise InputError(
                    f"no subject has all the images of pair {pair}",
                    hint="check the modalities found in the data and the --pairs option",
                )
        #: ids of subjects that serve no pair (missing a source or target image).
        self.skipped = tuple(sid for sid, found in usable.items() if not found)
        self.subjects: list[CachedSubject] = []
        #: (index into ``subjects``, pair) per item.
        self.items: list[tuple[int, Pair]] = []
        with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
            task = bar.add_task("Preprocessing", total=len(subjects))
            for subject in subjects:
                found = usable[subject.id]
                if found:
                    modalities = sorted({m for p in found for m in (*p.sources, p.target)})
                    self.subjects.append(
                        cache_subject(
                            subject, modalities, grid, cache_dir, reference=found[0].target, resample=resample
                        )
                    )
                    self.items += [(len(self.subjects) - 1, pair) for pair in found]
                bar.advance(task)
        self._arrays: dict[tuple[int, str], np.ndarray] = {}
        self._sources: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        # Memory maps are reopened in each DataLoader worker rather than pickled (which would copy them).
        return {**self.__dict__, "_arrays": {}, "_sources": OrderedDict()}

    def __len__(self) -> int:
        """Number of (item, slice) combinations: one nominal epoch."""
        return sum(self.subjects[s].depth for s, _ in self.items)

    def array(self, subject: int, modality: str) -> np.ndarray:
        """Memory map ``(z, H, W)`` float16 of one preprocessed image."""
        key = (subject, modality)
        if key not in self._arrays:
            if len(self._arrays) >= _MAX_OPEN_MAPS:
                self._arrays.clear()  # each map holds a file descriptor; the OS page cache keeps the data
            self._arrays[key] = self.subjects[subject].load(modality)
        return self._arrays[key]

    def source_array(self, subject: int, modality: str) -> np.ndarray:
        """``(z, H, W)`` of one image as a source: :meth:`array` normalised by ``source_norm``."""
        if self.source_norm == "percentile":
            return self.array(subject, modality)
        key = (subject, modality)
        if key in self._sources:
            self._sources.move_to_end(key)
            return self._sources[key]
        array = np.asarray(self.array(subject, modality), dtype=np.float32)
        ranked = normalize_source(array, modality, self.source_norm).astype(np.float16)
        while self._sources and sum(a.nbytes for a in self._sources.values()) + ranked.nbytes > SOURCE_CACHE_BYTES:
            self._sources.popitem(last=False)
        self._sources[key] = ranked
        return ranked

    def slice_weights(self, item: int) -> np.ndarray:
        """Sampling weights ``(z,)`` of an item's slices: the target's foreground fraction relative to its
        fullest slice, plus ``background_weight`` (empty slices are rare, not impossible)."""
        subject, pair = self.items[item]
        fg = self.subjects[subject].foreground[pair.target]
        peak = float(fg.max())
        return (fg / peak if peak > 0 else np.ones_like(fg)) + self.background_weight

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        item, z, seed = key
        subject, pair = self.items[item]
        volumes = [self.source_array(subject, m) for m in pair.sources]
        source, src_mod = source_stack(volumes, pair.sources, k=self.k, slots=self.slots, z=[z])
        source = source[0]
        target = np.asarray(self.array(subject, pair.target)[z : z + 1], dtype=np.float32)
        if self.augment is not None:
            source, target = self.augment(source, target, len(pair.sources), np.random.default_rng(seed))
        return {
            "source": torch.from_numpy(source),
            "src_mod": torch.from_numpy(src_mod),
            "tgt_mod": torch.tensor(modality_id(pair.target), dtype=torch.long),
            "target": torch.from_numpy(target),
            "skull": torch.tensor(int(shows_skull(self.subjects[subject].foreground[pair.sources[0]], self.grid))),
        }

    def sampler(self, *, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0) -> SliceSampler:
        """An infinite foreground-weighted :class:`SliceSampler` over this dataset (see its arguments)."""
        return SliceSampler(
            [self.slice_weights(i) for i in range(len(self.items))],
            seed=seed,
            rank=rank,
            world_size=world_size,
            start=start,
        )


class SliceSampler(torch.utils.data.Sampler):
    """Infinite stream of :data:`SampleKey` draws: an item uniformly, then a slice by its weight.

    The global stream depends only on ``seed``: it is cut into chunks, each drawn by a ``torch.Generator``
    seeded from ``(seed, chunk)``, and rank ``r`` of ``world_size`` takes draws ``r, r + world_size, ...``. So
    DDP ranks see disjoint samples, and a resumed run continues the same stream by passing ``start``.

    Args:
        weights: per item, the ``(z,)`` slice weights (non-negative, not all zero).
        seed: the stream's seed.
        rank, world_size: DDP position.
        start: number of draws this rank already consumed (e.g. ``step * batch_size``).
        chunk: draws per generator seed.
    """

    def __init__(
        self,
        weights: Sequence[np.ndarray],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        chunk: int = 4096,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.seed, self.rank, self.world_size, self.start, self.chunk = seed, rank, world_size, start, chunk
        probs = [np.asarray(w, dtype=np.float64) / float(np.sum(w)) / len(weights) for w in weights]
        self._probs = torch.from_numpy(np.concatenate(probs))
        self._item = np.repeat(np.arange(len(weights)), [len(w) for w in weights])
        self._z = np.concatenate([np.arange(len(w)) for w in weights])

    def _draw(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat (item, z) indices and augmentation seeds of one chunk of the global stream."""
        digest = hashlib.sha256(f"{self.seed}:{chunk}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        flat = torch.multinomial(self._probs, self.chunk, replacement=True, generator=generator)
        seeds = torch.randint(0, 2**62, (self.chunk,), generator=generator)
        return flat.numpy(), seeds.numpy()

    def __iter__(self) -> Iterator[SampleKey]:
        n = self.start * self.world_size + self.rank  # global draw index
        cached = -1
        while True:
            chunk, offset = divmod(n, self.chunk)
            if chunk != cached:
                flat, seeds, cached = *self._draw(chunk), chunk
            yield int(self._item[flat[offset]]), int(self._z[flat[offset]]), int(seeds[offset])
            n += self.world_size


##################################################################################
#                                    Split                                       #
##################################################################################


def split_subjects(
    ids: Sequence[str], *, val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic subject-level train/validation split.

    Subjects are ordered by a hash of ``(seed, id)`` (independent of their listing order, platform and library
    versions) and the first ``max(1, round(val_fraction * n))`` are validation; with fewer than 2 subjects or
    ``val_fraction == 0`` the validation list is empty.

    Returns:
        ``(train_ids, val_ids)``, each sorted.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"validation fraction {val_fraction} must be in [0, 1)")
    ordered = sorted(set(ids), key=lambda sid: hashlib.sha256(f"{seed}:{sid}".encode()).hexdigest())
    n_val = 0 if len(ordered) < 2 or val_fraction == 0 else max(1, round(val_fraction * len(ordered)))
    n_val = min(n_val, len(ordered) - 1)
    return sorted(ordered[n_val:]), sorted(ordered[:n_val])
