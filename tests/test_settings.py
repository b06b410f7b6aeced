"""One declaration per setting: the stage models (DistillConfig, FinetuneConfig) are the only place a setting lives;
``edgeforge distill`` / ``edgeforge finetune`` options and the pipeline file's sections are derived from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from click.testing import CliRunner

from edgeforge.build.config import (
    BUILD_ONLY_DISTILL_SETTINGS,
    DISTILL_RUN_INPUTS,
    FINETUNE_RUN_INPUTS,
    DistillSection,
    FinetuneSection,
    default_pipeline_yaml,
    validate_pipeline,
)
from edgeforge.cli.app import cli
from edgeforge.distill.config import DistillConfig, DistillSettings
from edgeforge.errors import BadInputError
from edgeforge.finetune.config import FinetuneConfig, FinetuneSettings
from edgeforge.settings import extra, flag_of

DEFAULT_YAML = Path(__file__).resolve().parent.parent / "pipelines" / "default.yaml"


def _cli_defaults(command: str, args: list[str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """What the command's parser hands the command with only ``args`` given, and each parameter's flags."""
    cmd = cli.commands[command]
    ctx = cmd.make_context(command, list(args))
    return ctx.params, {p.name: p.opts for p in cmd.params if p.name}


def _as_json(value: Any) -> Any:
    """A default as the pipeline file writes it (tuples as lists, paths as text)."""
    if isinstance(value, tuple | list):
        return [_as_json(v) for v in value]
    return str(value) if isinstance(value, Path) else value


@pytest.mark.parametrize("command, model, args, skip", [
    ("distill", DistillConfig, ["--out", "s"], {"out"}),
    ("finetune", FinetuneConfig, ["m", "--task", "home-commands", "--out", "f"], set()),
])
def test_every_field_is_an_option_with_the_models_default(command: str, model: type, args: list[str], skip: set):
    params, flags = _cli_defaults(command, args)
    internal = {n for n, f in model.model_fields.items() if extra(f).get("internal")}
    assert internal <= {"train"}, internal  # only library hooks may stay off the command line
    for name, info in model.model_fields.items():
        if name in internal:
            assert name not in flags
            continue
        assert name in flags, f"{name} has no --option"
        assert flag_of(name, info) in flags[name], (name, flags[name])
        assert info.description, f"{name} has no help"
        if name not in skip:
            assert params[name] == info.get_default(call_default_factory=True), name


def test_declared_flag_names_are_kept():
    """The flags the README and docs use where the flag is not the field's name."""
    _, flags = _cli_defaults("distill", ["--out", "s"])
    assert flags["student_dir"] == ["--student"] and flags["generate_answers"] == ["--no-generate"]
    assert flags["extra_teachers"] == ["--extra-teacher"] and flags["profiles_dirs"] == ["--profiles-dir"]


def test_the_cli_builds_the_same_config_as_the_library():
    for args, direct in (
        (["--student-layers", "2", "--progressive", "3,2", "--no-generate", "--data", "x.txt"],
         {"student_layers": 2, "progressive": (3, 2), "generate_answers": False, "data": (Path("x.txt"),)}),
        (["--profile", "raspberry-pi-zero-2w", "--extra-teacher", "a", "--extra-teacher", "b", "--teacher-weights",
          "1,1,2", "--checkpoint-every", "0"],
         {"profile": "raspberry-pi-zero-2w", "extra_teachers": ("a", "b"), "teacher_weights": (1.0, 1.0, 2.0),
          "checkpoint_every": 0}),
    ):
        params, _ = _cli_defaults("distill", ["--out", "s", *args])
        from_cli = DistillConfig(**{k: v for k, v in params.items() if k not in ("as_json", "force")})
        assert from_cli == DistillConfig(out=Path("s"), **direct) and from_cli.steps == 150
    params, _ = _cli_defaults("finetune", ["m", "--task", "t", "--out", "f", "--rank-sweep", "16,4,8,4",
                                           "--target-modules", "q_proj, v_proj", "--checkpoint-every", "0"])
    cfg = FinetuneConfig(**{k: v for k, v in params.items() if k in FinetuneConfig.model_fields})
    assert cfg.rank_sweep == (4, 8, 16) and cfg.target_modules == ["q_proj", "v_proj"] and cfg.checkpoint_every == 0


@pytest.mark.parametrize("section, settings, run_config, inputs", [
    ("distill", DistillSection, DistillConfig, DISTILL_RUN_INPUTS),
    ("finetune", FinetuneSection, FinetuneConfig, FINETUNE_RUN_INPUTS),
])
def test_every_setting_is_in_the_pipeline_file_with_the_same_default(section: str, settings: type, run_config: type,
                                                                     inputs: dict[str, str]):
    written = yaml.safe_load(DEFAULT_YAML.read_text(encoding="utf-8"))[section]
    stage = DistillSettings if section == "distill" else FinetuneSettings
    build_only = BUILD_ONLY_DISTILL_SETTINGS if section == "distill" else {"enabled"}
    assert set(written) == set(settings.model_fields) == set(stage.model_fields) | build_only
    for name, info in stage.model_fields.items():
        assert written[name] == _as_json(info.get_default(call_default_factory=True)), name
    # every field of the run's config is either a section setting or an input the build supplies, never both
    assert set(run_config.model_fields) == set(stage.model_fields) | set(inputs)
    assert not set(stage.model_fields) & set(inputs)


def test_default_yaml_is_generated_from_the_models():
    text = DEFAULT_YAML.read_text(encoding="utf-8")
    assert text == default_pipeline_yaml(), "regenerate: python -m edgeforge.build.config > pipelines/default.yaml"
    assert text.startswith("# edgeforge build --config pipelines/default.yaml")


@pytest.mark.parametrize("args, fragment", [
    (["distill", "--student-layers", "2", "--steps", "-1"], "--steps: expected an integer >= 0, found -1"),
    (["distill", "--student-layers", "2", "--loss", "kl"], "--loss: expected forward_kl | reverse_kl | jsd"),
    (["distill", "--student-layers", "2", "--jsd-beta", "1"], "--jsd-beta: expected a number in (0, 1)"),
    (["distill", "--progressive", "20,x"], "--progressive: expected comma-separated integers"),
    (["distill", "--student-layers", "2", "--seq-len", "16", "--on-policy-ratio", "0.5", "--on-policy-tokens",
      "16"], "--on-policy-tokens: expected fewer than --seq-len (16)"),
    (["finetune", "m", "--task", "home-commands", "--rank", "0"], "--rank: expected an integer >= 1"),
    (["finetune", "m", "--task", "home-commands", "--rank-sweep", "0,4"], "--rank-sweep: expected"),
])
def test_a_bad_value_is_one_error_line_exit_2(tmp_path: Path, args: list[str], fragment: str):
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "o")])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and lines == [f"edgeforge: error: {lines[0].removeprefix('edgeforge: error: ')}"]
    assert fragment in lines[0] and "Traceback" not in r.output


@pytest.mark.parametrize("data, fragment", [
    ({"distill": {"stepz": 3}}, "distill.stepz"),
    ({"finetune": {"temperature": 1.0}}, "finetune.temperature"),  # a distillation setting, not a fine-tuning one
    ({"distill": {"out": "x"}}, "distill.out"),  # the build decides where the student goes
    ({"distill": {"steps": -1}}, "distill.steps"),
])
def test_the_pipeline_refuses_unknown_keys_and_bad_values(data: dict, fragment: str):
    with pytest.raises(BadInputError, match=fragment):
        validate_pipeline(data, "p.yaml")


def test_the_library_config_refuses_unknown_names():
    with pytest.raises(BadInputError, match="stepz: not a setting of DistillConfig"):
        DistillConfig(student_layers=2, stepz=3)
    with pytest.raises(BadInputError, match="--ewc: expected a number >= 0, found -1"):
        FinetuneConfig(ewc=-1)


def test_choices_match_the_modules_that_implement_them():
    from edgeforge.distill import config as c
    from edgeforge.distill.losses import DEFAULT_CHUNK, DIVERGENCES
    from edgeforge.distill.prune import INIT_METHODS
    from edgeforge.distill.techniques.curriculum import CURRICULA, PACINGS
    from edgeforge.distill.techniques.multi_teacher import ROUTINGS
    from edgeforge.distill.techniques.progressive import PROGRESSIVE_FROM
    from edgeforge.distill.techniques.rationale import TASK_LOSSES

    for literal, implemented in ((c.InitMethod, INIT_METHODS), (c.Divergence, DIVERGENCES), (c.Curriculum, CURRICULA),
                                 (c.Pacing, PACINGS), (c.Routing, ROUTINGS), (c.ProgressiveFrom, PROGRESSIVE_FROM),
                                 (c.TaskLoss, TASK_LOSSES), (c.ParallelMode, c.PARALLEL_MODES)):
        assert get_args(literal) == tuple(implemented)
    assert DistillSettings().chunk_size == DEFAULT_CHUNK
