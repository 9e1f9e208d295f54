"""lora.config: the frozen TrainConfig, its validation, the generated CLI and config files."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, fields

import pytest

from lora.config import (
    TABLE5_SETS,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    load_config_file,
    weight_set_label,
)
from lora.errors import ArgumentParser, UserError


def test_defaults_are_the_section7_grid():
    cfg = TrainConfig()
    assert cfg.targets == ("q,v",)
    assert cfg.ranks == (1, 2, 4, 8, 64)
    assert cfg.seeds == (0, 1, 2)
    assert cfg.scale_alpha(1) == cfg.scale_alpha(64) == 8.0  # a fixed alpha, as in the paper
    assert TrainConfig(alpha=None).scale_alpha(64) == 64.0  # alpha = r: s = 1
    assert TrainConfig.from_dict({"alpha": "r"}).alpha is None
    with pytest.raises(FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_budget_mode_defaults_to_table5_sets_and_excludes_ranks():
    cfg = TrainConfig(budget=1000)
    assert cfg.targets == TABLE5_SETS and cfg.ranks is None
    with pytest.raises(UserError, match="--budget"):
        TrainConfig(budget=1000, ranks=(4,))


def test_every_field_is_documented_with_a_reason():
    for f in fields(TrainConfig):
        assert len(f.metadata["help"]) > 20, f.name


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"ranks": (0,)}, "--ranks"),
        ({"ranks": (4, 4)}, "--ranks"),
        ({"seeds": (-1,)}, "--seeds"),
        ({"lr": -1e-3}, "--lr"),
        ({"lr": float("nan")}, "--lr"),
        ({"alpha": 0.0}, "--alpha"),
        ({"steps": 0}, "--steps"),
        ({"steps": 10, "epochs": 1.0}, "--steps"),
        ({"batch_size": 0}, "--batch-size"),
        ({"dropout": 1.0}, "--dropout"),
        ({"init": "xavier"}, "--init"),
        ({"targets": ("",)}, "--targets"),
        ({"task": "/nonexistent/data.jsonl"}, "--task"),
        ({"val_file": "v.jsonl"}, "--val-file"),
    ],
)
def test_bad_values_raise_user_errors_naming_the_option(kwargs, option):
    with pytest.raises(UserError, match=option):
        TrainConfig(**kwargs)


def test_total_steps_from_epochs():
    assert TrainConfig(epochs=2.0, batch_size=10).total_steps(95) == 20  # 10 batches per epoch
    assert TrainConfig(steps=7).total_steps(95) == 7


def test_round_trip_through_dict_and_json():
    cfg = TrainConfig(ranks=(2, 4), seeds=(3,), targets=("q", "q,k,v,o"), alpha=16.0)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(UserError, match="unknown option"):
        TrainConfig.from_dict({"rnaks": [1]})


def _parse(argv, file_values=None):
    parser = ArgumentParser(prog="t")
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv), file_values)


def test_cli_is_generated_from_fields_and_overrides_the_file(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('ranks = [1, 64]\nlr = 0.01\ntargets = ["q", "v"]\n')
    file_values = load_config_file(toml)
    cfg = _parse(["--lr", "0.002", "--targets", "q,k", "--no-linear-probe", "--alpha", "r"], file_values)
    assert cfg.alpha is None
    assert cfg.ranks == (1, 64)  # from the file
    assert cfg.lr == 0.002  # the flag wins
    assert cfg.targets == ("q,k",)
    assert cfg.linear_probe is False
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"seeds": [5], "max-length": 16}))
    cfg = _parse([], load_config_file(js))
    assert cfg.seeds == (5,) and cfg.max_length == 16


def test_bad_config_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(UserError, match="cannot parse"):
        load_config_file(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"lr": "fast"}))
    with pytest.raises(UserError):
        _parse([], load_config_file(wrong))


def test_cli_parse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["--ranks", "x"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_weight_set_labels():
    assert weight_set_label("q,v") == "qv"
    assert weight_set_label("q,k,v,o") == "qkvo"
    assert weight_set_label("query,value") == "query-value"
    assert weight_set_label("attn.c_attn:q") == "attn-c_attn-q"
