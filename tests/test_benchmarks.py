"""The benchmark scripts' own bookkeeping: what `benchmarks/quality.py` samples and reports for a trained model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from phmdiff_cli.engine.hub import DEFAULT_MODEL, SHIPPED_WEIGHTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402  (a script folder, not a package)


def test_quality_samples_with_the_sampler_steps_and_reports_the_total_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[list[int]] = []

    def fake_sample(model: object, source: torch.Tensor, *args: object, steps: list[int], **kw: object) -> tuple:
        calls.append(steps)
        return (torch.zeros(source.shape[0], 1, *source.shape[-2:]),)

    monkeypatch.setattr(quality, "sample", fake_sample)
    args = argparse.Namespace(steps=None, seed=0)
    method = quality.phmdiff_method("shipped", SHIPPED_WEIGHTS / DEFAULT_MODEL, args, None)
    batch = {"source": torch.zeros(2, 3, 3, 8, 8), "src_mod": torch.zeros(2, 3), "tgt_mod": torch.zeros(2)}
    method.predict(batch)
    card = quality.load_pretrained(SHIPPED_WEIGHTS / DEFAULT_MODEL)
    training = card.card["training"]
    assert calls == [list(card.config.sampling.steps)]  # the card's schedule, e.g. [3, 2, 2]
    assert method.evals == sum(card.config.sampling.steps)  # Euler: one evaluation per step
    assert method.steps == training["steps"] + training["init"]["steps"]  # the fine-tune and its initial model
    assert method.budget_min == round((training["elapsed_s"] + training["init"]["elapsed_s"]) / 60, 1)
