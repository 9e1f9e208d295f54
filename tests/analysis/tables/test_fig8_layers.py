"""Figure 8's layers (issue 24): above the dense threshold W's top 10 % is the report's largest cost, so Figure 8
is computed at 5 evenly spaced layers there (``--fig8-layers auto``), at every layer below it, or where the user
says. The rows kept are the rows the every-layer table has for those layers, and bad choices are one line."""

from __future__ import annotations

import pandas as pd
import pytest
from llama_checkpoint import peft_adapter, save_llama

import lora_analysis.tables.build as build
from lora.errors import UserError
from lora_analysis import figures
from lora_analysis.load.adapters import load_adapter_dir
from lora_analysis.load.base import BaseWeights
from lora_analysis.tables.build import fig8_layers_for, weight_tables

LAYERS = 7


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    """A 7-layer LLaMA-layout checkpoint and a q/v adapter on it (r = 2)."""
    root = tmp_path_factory.mktemp("fig8layers")
    ckpt = save_llama(root / "ckpt", layers=LAYERS)
    peft_adapter(ckpt, root / "runs" / "r2", r=2)
    return {"ckpt": ckpt, "runs": root / "runs", "adapter": load_adapter_dir(root / "runs" / "r2")}


def test_every_layer_up_to_the_dense_threshold_and_five_spread_layers_above(seven, monkeypatch):
    a = seven["adapter"]
    assert fig8_layers_for([a]) is None  # d = 32: the full SVD is computed anyway
    monkeypatch.setattr(build, "DENSE_SVDVALS_MAX", 16)  # as if W were 7B-sized
    # linspace(0, 6, 5) = 0, 1.5, 3, 4.5, 6, rounded half to even: first and last kept, the middle one shown
    assert fig8_layers_for([a]) == [0, 2, 3, 4, 6]
    assert fig8_layers_for([a], choice="all") is None
    assert fig8_layers_for([a], choice=[5, 1, 5]) == [1, 5]
    with pytest.raises(UserError, match=r"Figure 8 layers: layer\(s\) 9 not adapted; adapted layers: 0, 1, 2, 3, 4, 5, 6"):
        fig8_layers_for([a], choice=[1, 9])
    with pytest.raises(ValueError, match="expected 'auto', 'all'"):
        fig8_layers_for([a], choice="some")


def test_the_rows_kept_are_the_every_layer_rows_of_those_layers(seven):
    a = seven["adapter"]
    every = weight_tables([a], BaseWeights(seven["ckpt"], lazy=True), tables=("fig8",), fig8=[0])["fig8"]
    some = weight_tables([a], BaseWeights(seven["ckpt"], lazy=True), tables=("fig8",), fig8=[0],
                         fig8_layers=[0, 3])["fig8"]
    assert sorted(set(every["layer"])) == list(range(LAYERS)) and sorted(set(some["layer"])) == [0, 3]
    expected = every[every["layer"].isin([0, 3])].reset_index(drop=True)
    pd.testing.assert_frame_equal(some.reset_index(drop=True), expected)


@pytest.mark.parametrize(("value", "message"), [
    ("0,x", "--fig8-layers '0,x': expected auto, all or a comma list of layer indices"),
    ("-1", "--fig8-layers '-1': expected auto, all or a comma list of layer indices"),
    ("12", "--fig8-layers: layer(s) 12 not adapted in "),
])
def test_a_bad_choice_is_one_line_and_exit_2(seven, tmp_path, capsys, value, message):
    out = tmp_path / "out"
    rc = figures.main(["--runs", str(seven["runs"]), "--out", str(out), "--quiet", "--base", str(seven["ckpt"]),
                       "--lazy-base", "--spectral-cache", str(tmp_path / "c"), "--fig8-layers", value])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("note: ")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), err
    assert not out.exists()
