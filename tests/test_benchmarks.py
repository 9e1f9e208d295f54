"""benchmarks: the interleaving harness, one tiny real case end to end (JSON schema, ratio = ours/peer), bad input."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.__main__ import main
from benchmarks.harness import compare, interleave, result_from_runs


def test_interleave_alternates_order_after_warmup():
    calls: list[str] = []
    t = interleave(lambda: calls.append("o"), lambda: calls.append("p"), reps=4, warmup=1)
    assert len(t.ours) == len(t.peer) == 4
    # warm-up (o, p), then o p | p o | o p | p o: the order flips every repetition
    assert "".join(calls) == "op" + "op" + "po" + "op" + "po"
    with pytest.raises(ValueError, match="reps"):
        interleave(lambda: None, lambda: None, reps=0)


def test_result_ratio_and_goals():
    r = result_from_runs("x", [2.0, 4.0, 3.0], [1.0, 2.0, 2.0], peer_name="peer 1.0", goal_max=1.0)
    assert r.ours == 3.0 and r.peer == 2.0 and r.ratio == 1.5 and r.met is False
    j = r.to_json()
    assert j["ours_s"] == 3.0 and j["peer_s"] == 2.0 and j["ratio"] == 1.5
    assert (j["paired_ratio_min"], j["paired_ratio_max"]) == (1.5, 2.0)
    s = result_from_runs("y", [1.0], [4.0], peer_name="p", goal_min_speedup=3.0)
    assert s.met is True and s.goal == "speed-up >= 3x"
    m = result_from_runs("z", [10.0], [20.0], peer_name="p", unit="MiB")
    assert m.to_json()["ours_mib"] == 10.0 and "ours_s" not in m.to_json()
    c = compare("c", lambda: None, lambda: sum(range(1000)), peer_name="p", reps=3)
    assert len(c.ours_runs) == 3 and c.ratio > 0


def test_cli_runs_one_real_case(tmp_path, capsys):
    out_json, out_md = tmp_path / "b.json", tmp_path / "B.md"
    rc = main(["--quick", "--cases", "svd_factored_vs_dense", "--json", str(out_json), "--out", str(out_md),
               "--threads", "1"])
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert set(data) >= {"cases", "machine", "date"}
    assert list(data["cases"]) == ["svd_factored_vs_dense[1024x1024,r=8]"]
    for case in data["cases"].values():
        assert {"ours_s", "peer_s", "ratio", "peer"} <= set(case)
        assert isinstance(case["peer"], str) and "torch" in case["peer"]
        assert math.isclose(case["ratio"], case["ours_s"] / case["peer_s"], rel_tol=1e-12)
        assert case["ours_min"] <= case["ours_s"] <= case["ours_max"]
        assert case["sv_rel_err"] < 1e-10  # the factored SVD is exact, not an approximation
    md = out_md.read_text()
    assert "## Machine" in md and "svd_factored_vs_dense[1024x1024,r=8]" in md and "## Headline" in md
    assert "svd_factored_vs_dense" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--cases", "nope"], "--cases"),
    (["--threads", "0"], "--threads"),
    (["--quick", "--bogus"], "unrecognized"),
])
def test_cli_bad_input(argv, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) if "--bogus" in argv else _nullcontext():
        rc = main(argv + ["--out", str(tmp_path / "B.md")])
        assert rc == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "B.md").exists()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_competitor_is_paused_until_resumed_and_killed_on_exit():
    import os
    import time

    from benchmarks.cases_load import competitor

    def cpu_seconds(pid: int) -> float:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    with competitor() as proc:
        time.sleep(0.3)
        paused = cpu_seconds(proc.pid)
        time.sleep(0.3)
        assert cpu_seconds(proc.pid) - paused < 0.05  # SIGSTOPped: it burns nothing while the idle step runs
        proc.send_signal(__import__("signal").SIGCONT)
        deadline = time.monotonic() + 20  # a busy machine may give it a core late, but it must burn CPU
        while cpu_seconds(proc.pid) - paused < 0.1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cpu_seconds(proc.pid) - paused >= 0.1  # resumed: a CPU-bound competitor
    assert proc.poll() is not None  # gone after the case


def test_headline_and_interpretation_name_the_load_and_auto_pack_cases():
    from benchmarks.__main__ import headline, interpretation

    one = result_from_runs("train_step_under_load[threads=1]", [0.5, 0.6, 0.7], [0.2, 0.2, 0.2],
                           peer_name="idle", goal_max=2.0, extra={"load_avg_start": 4.0, "load_avg_end": 4.0})
    two = result_from_runs("train_step_under_load[threads=2]", [3.0, 3.0, 3.0], [0.15, 0.15, 0.15],
                           peer_name="idle", extra={"vs_1thread_loaded": 5.0, "load_avg_start": 4.0})
    auto = result_from_runs("packed_sweep_auto_vs_sequential[b=32]", [1.0, 1.1, 1.0], [1.0, 1.0, 1.0],
                            peer_name="sequential", goal_max=1.05, extra={"packed": 0.0})
    lines = " ".join(headline([one, two, auto]))
    assert "3.00× its idle time" in lines and "20.00× its own idle time" in lines and "5.00× the loaded" in lines
    assert "1.00× the speed of sequential at b=32 (one by one)" in lines
    assert "Packed training of a sweep grid" not in lines  # the auto case is not a packed-vs-sequential case
    why = " ".join(interpretation({c.name: c.to_json() for c in (one, two, auto)}))
    assert "train_step_under_load" in why and "load average was 4.0" in why  # 3.00x > 2: a miss, explained
    assert "packed_sweep_auto" not in why  # 1.0 <= 1.05: met


def test_section7_quick_mode_is_exact_against_the_dense_route(tmp_path):
    """`--quick --cases section7_7b_shaped`: the reduced 7B-shaped case runs, claims no goal, and carries
    ``ours_s`` and an ``accuracy`` record: every Table 7 column of layer 0's W_q within 1e-6 of the dense route."""
    out_json = tmp_path / "b.json"
    assert main(["--quick", "--cases", "section7_7b_shaped", "--json", str(out_json), "--no-report"]) == 0
    (name, case), = json.loads(out_json.read_text())["cases"].items()
    assert name.startswith("section7_7b_shaped[reduced") and case["met"] is None and case["ours_s"] > 0
    acc = case["accuracy"]
    assert acc["table7_w_rel_err"] < 1e-6 and acc["table7_max_rel_err"] < 1e-6
    assert set(acc["table7_rel_err_by_column"]) >= {"delta", "weight", "random", "dw_norm", "amplification"}
    assert acc["w_top_sv_max_rel_err"] < 1e-6
    assert case["table7_rows"] == 2 * 2 * 4  # 2 layers x {q, v} x (2 ranks x 2 seeds)


def test_lowrank_resize_sides_agree_with_peft_and_dense_on_a_small_adapter(tmp_path):
    """The three resize sides of ``resize_7b`` at d = 64 (one layer, q and v, r = 16 -> 8): ours, peft's
    ``convert_to_lora`` and the dense float64 route give the same ΔW_8. Tolerances: ours is written in float32
    (relative rounding ~6e-8 x √64) and peft runs its SVD in float32; the top-8 subspace moves by rounding / (relative
    gap σ_8 − σ_9, ~1e-2 for these Gaussian factors), hence 1e-4. The same comparison against ΔW_7 must fail: it
    differs by σ_8 / ‖ΔW_8‖_F, well above 1e-2."""
    from benchmarks.cases_lowrank import (
        PROJS,
        _delta,
        _dense_truncate,
        _max_rel,
        _resize_dense,
        _resize_ours,
        _resize_peft,
    )
    from benchmarks.cases_report7b import module_key, write_adapters
    from lora.adapter_io import load_adapter

    adapter = str(write_adapters(tmp_path, tmp_path, projs=PROJS, ranks=(16,), seeds=(0,), n_layers=1, d=64)[0])
    keys = [module_key(0, p) for p in PROJS]
    ours = _resize_ours(adapter, 1, keys)
    peft_side, dense = _resize_peft(adapter, 1), _resize_dense(adapter, keys)
    assert ours["modules"] == peft_side["modules"] == 2
    assert _max_rel(ours["dw"], peft_side["dw"]) < 1e-4
    assert _max_rel(ours["dw"], dense["dw"]) < 1e-4
    f = load_adapter(adapter).factors[keys[0]]
    rank7 = {keys[0]: _dense_truncate(f.scaling * _delta(f.A, f.B), 7)}
    assert _max_rel(ours["dw"], rank7) > 1e-2
