"""Training settings, model configuration, run folder, EMA and progress ETA: the parts of `phmdiff train`
that need no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from phmdiff_cli.data.layouts import discover
from phmdiff_cli.data.summary import summary
from phmdiff_cli.engine.ema import EMA
from phmdiff_cli.engine.progress import Reporter
from phmdiff_cli.engine.run_folder import RunFolder
from phmdiff_cli.engine.settings import (
    DEFAULT_MAX_STEPS,
    TrainSettings,
    auto_spacing,
    build_model_config,
    load_settings,
    resumed_settings,
)
from phmdiff_cli.errors import InputError


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path: Path) -> None:
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"size": "tiny", "batch-size": 16, "lr": 1e-3, "val_subjects": ["A"]}))
    settings = load_settings(config, {"lr": 5e-4, "max_steps": 10})
    assert (settings.size, settings.batch_size, settings.lr, settings.max_steps) == ("tiny", 16, 5e-4, 10)
    assert settings.val_subjects == ["A"] and settings.ema_decay == TrainSettings().ema_decay
    # a run folder's train_config.json is a config file too
    config.write_text(json.dumps({"settings": settings.to_dict(), "model": {}}))
    assert load_settings(config, {}) == settings


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a JSON config file"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"sise": "tiny"}', "unknown setting(s) sise"),
        ('{"batch_size": "8"}', "setting 'batch_size' must be int"),
        ('{"compile": 1}', "setting 'compile' must be bool"),
        ('{"val_subjects": "A,B"}', "setting 'val_subjects' must be list[str] | None"),
        ('{"mask_ratio": 1.0}', "--mask-ratio 1.0 must be in [0, 1)"),
        ('{"lr": -1}', "--lr -1 must be a positive number"),
        ('{"val_sampler": "ddim"}', "--val-sampler 'ddim' must be one of heun, euler"),
        ('{"rotate": 200}', "--rotate 200 must be in [0, 180] degrees"),
        ('{"zoom": -0.1}', "--zoom -0.1 must be in [0, 1)"),
        ('{"translate": -4}', "--translate -4 must not be negative"),
        ('{"init": "brain-small", "levels": 2}', "--levels cannot be used with --init"),
        ('{"init": "brain-small", "size": "tiny", "cgr_pixel": 0}', "--size, --cgr-pixel cannot be used"),
        ('{"init": "brain-small", "model": {"depth": 4, "diffusion": {}}}', "model fields but diffusion, sampling"),
    ],
)
def test_bad_config_files(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "train.json"
    config.write_text(content)
    with pytest.raises(InputError) as error:
        load_settings(config, {})
    assert message in error.value.message


def test_resume_may_change_only_budgets_and_hardware() -> None:
    saved = TrainSettings(data="d", pairs="t1n:t2w", size="tiny", max_steps=100).to_dict()
    settings = resumed_settings(saved, {"max_steps": 200, "device": "cpu", "size": "tiny"}, Path("run"))
    assert (settings.max_steps, settings.device, settings.size) == (200, "cpu", "tiny")
    with pytest.raises(InputError, match="cannot change --batch-size, --pairs when resuming"):
        resumed_settings(saved, {"pairs": "t1n:t2f", "batch_size": 2}, Path("run"))


def test_budget_and_learning_rate_schedule() -> None:
    assert TrainSettings().step_budget == DEFAULT_MAX_STEPS and TrainSettings(minutes=5).step_budget is None
    settings = TrainSettings(lr=1e-3, max_steps=100)
    assert settings.warmup == 10
    assert [settings.lr_at(s) for s in (0, 4, 9, 50)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3])
    assert TrainSettings(minutes=5).warmup == 500 and TrainSettings(warmup_steps=0).lr_at(0) == 2e-4


def test_lr_cooldown_decays_over_the_first_budget_to_run_out() -> None:
    both = TrainSettings(lr=1e-3, max_steps=100, minutes=10, lr_cooldown=0.2)
    assert both.progress(50, 0.0) == 0.5 and both.progress(10, 540.0) == pytest.approx(0.9)  # the clock leads
    # constant until 80 % of the budget, then linear to 0 at its end
    assert [both.lr_at(50, p) for p in (0.5, 0.8, 0.9, 1.0)] == pytest.approx([1e-3, 1e-3, 5e-4, 0.0])
    assert TrainSettings(lr=1e-3, max_steps=100).lr_at(50, 0.99) == 1e-3  # no cooldown by default
    saved = TrainSettings(data="d", pairs="t1n:t2w", max_steps=100).to_dict()
    saved.pop("lr_cooldown")  # a run from before the setting existed resumes, and may add a cooldown
    assert resumed_settings(saved, {"lr_cooldown": 0.3}, Path("run")).lr_cooldown == 0.3
    TrainSettings(lr_cooldown=1.0).check()  # 1: a linear decay over the whole budget
    with pytest.raises(InputError, match="--lr-cooldown 1.5 must be in"):
        TrainSettings(lr_cooldown=1.5).check()


def test_model_config_follows_levels_mask_ratio_and_overrides() -> None:
    settings = TrainSettings(
        size="tiny",
        levels=2,
        mask_ratio=0.3,
        cgr_feature=0.0,
        context=2,
        source_norm="rank",
        spacing=2.5,
        model={"depth": 3, "sampling": {"sampler": "euler"}},
    )
    config = build_model_config(settings, sources=1)
    assert (config.levels, config.patch_sizes, config.mask_ratios) == (2, (4, 8), (0.3, 0.3))
    assert [config.grid_size(level) for level in range(2)] == [8, 8]  # every level keeps the token grid
    assert config.sampling.steps == (4, 3) and config.sampling.sampler == "euler"
    assert (config.diffusion.cgr_feature, config.diffusion.cgr_pixel) == (0.0, 0.1)
    assert (config.context, config.depth, config.spacing_mm, config.max_sources) == (2, 3, 2.5, 3)
    assert config.source_norm == "rank"
    with pytest.raises(InputError, match="source_norm 'zscore'"):
        build_model_config(TrainSettings(size="tiny", source_norm="zscore"), sources=1)
    assert build_model_config(TrainSettings(size="tiny"), sources=4).max_sources == 4
    with pytest.raises(InputError, match="unknown fields"):
        build_model_config(TrainSettings(size="tiny", model={"nope": 1}), sources=1)


def test_auto_spacing_fits_the_field_of_view(brats_dir: Path) -> None:
    facts = summary(discover(brats_dir))  # 240 x 240 voxels at 1 mm
    assert auto_spacing(facts, {"t1n", "t2w"}, 64) == 3.75
    assert auto_spacing(facts, {"t1n"}, 240) == 1.0
    assert auto_spacing(facts, {"t1n"}, 100) == 2.4


def test_run_folder_refuses_to_overwrite_and_force_keeps_the_cache(tmp_path: Path) -> None:
    run = RunFolder.create(tmp_path / "runs" / "a", force=False)  # parents are created
    run.write_json(run.config, {"settings": {}})
    run.cache.mkdir()
    (run.cache / "entry").write_text("kept")
    run.state.mkdir()
    with pytest.raises(InputError, match="run folder already exists"):
        RunFolder.create(run.root, force=False)
    RunFolder.create(run.root, force=True)
    assert [p.name for p in run.root.iterdir()] == ["cache"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("")
    with pytest.raises(InputError, match="not a phmdiff run folder"):
        RunFolder.create(tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_log_truncation_drops_steps_after_the_checkpoint_and_cut_lines(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    for step in (2, 4, 6):
        run.log({"step": step, "loss": 1.0})
    with run.metrics.open("a") as handle:
        handle.write('{"step": 8, "lo')  # killed while writing
    run.truncate_log(4)
    assert [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()] == [2, 4]


def test_ema_warms_up_then_averages() -> None:
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, 0.1 * start + 0.9 * model.weight)
    ema.updates = 1000
    assert ema.current_decay() == 0.9
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_eta_is_the_sooner_budget() -> None:
    reporter = Reporter(Console(), quiet=True, total=1000, minutes=10.0, start=0)
    assert reporter.eta(900, steps_per_s=10.0, elapsed=0.0) == 10.0  # 100 steps left at 10 steps/s
    assert reporter.eta(0, steps_per_s=10.0, elapsed=590.0) == 10.0  # 10 s of the time budget left
    reporter = Reporter(Console(), quiet=True, total=None, minutes=None, start=0)
    assert reporter.eta(0, steps_per_s=10.0, elapsed=0.0) is None
