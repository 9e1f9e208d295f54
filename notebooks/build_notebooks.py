"""Build (and optionally execute) the notebooks in this folder from the cell lists below (nbformat v4).

The notebooks only call the library and show its results: no maths, no plotting helpers, no ``sys.path``
changes, no unseeded randomness. Their first code cell is tagged ``parameters`` (papermill's convention) and sets
``RUN_DIR`` to the default run (:func:`lora.rundir.default_run_dir`, seen from this folder) and any other inputs;
:func:`execute` overrides them by inserting a cell after it, as papermill does (the tests point them at a tiny
run).

    python notebooks/build_notebooks.py             # write the six .ipynb files (unexecuted)
    python notebooks/build_notebooks.py --execute   # write and execute them in place (figures embedded)

``--execute`` is how the committed notebooks are produced once ``python -m lora_analysis.reproduce`` has
trained the default run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}

PARAMETERS = """\
import os

from lora.rundir import default_run_dir

# The run to analyse: the default run of `python -m lora_analysis.reproduce` ($LORA_RUNS_DIR if set), seen from
# notebooks/ (a relative path is relative to the repository root, one level up).
RUN_DIR = os.path.join("..", default_run_dir())
"""

SETUP = """\
%matplotlib inline
from lora_analysis import pipeline
from lora_analysis.load.run import Run
from lora_analysis.render import figures
from lora_analysis.verdicts.claims import claims_table

analysis = pipeline.analyse(Run.open(RUN_DIR), cache=True)  # analysed once per run, then read from RUN_DIR/analysis/
tables = analysis.tables
"""


def _nb(cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells, metadata={"kernelspec": KERNEL, "language_info": {"name": "python"}})
    return nb


def _params(source: str = PARAMETERS):
    return new_code_cell(source, metadata={"tags": ["parameters"]})


def subspace_similarity() -> nbformat.NotebookNode:
    return _nb([
        new_markdown_cell(
            "# Subspace similarity between LoRA updates (Section 7.2, Figures 3, 4, 6, 7)\n\n"
            "For two adapters of the same weight, let $U_1$ hold the right singular vectors of $A_1$ "
            "(shape $(d_{in}, r_1)$) and $U_2$ those of $A_2$. The paper's normalized subspace similarity is\n\n"
            "$$\\phi(A_1, A_2, i, j) = \\frac{\\lVert U_1[:, :i]^\\top U_2[:, :j] \\rVert_F^2}{\\min(i, j)} \\in [0, 1],$$\n\n"
            "1 when one top subspace contains the other, 0 when they are orthogonal. For two *random* subspaces "
            "$E[\\phi(i, j)] = \\max(i, j) / d_{in}$: that is the baseline each figure is drawn beside.\n\n"
            "With nested initialisation the start of $A_8$ is the first rows of the start of $A_{64}$, so part of a "
            "rank-vs-rank similarity can come from the start; the initialisation control below separates it."),
        _params(),
        new_code_cell(SETUP),
        new_markdown_cell("## Figure 3: a small rank against a large rank, same seed\n\n"
                          "The paper: the top direction is shared ($\\phi > 0.5$), the others look like noise."),
        new_code_cell('figures.draw("figure3", tables);'),
        new_markdown_cell("## Figure 4: two seeds at the largest rank, beside two random Gaussian matrices\n\n"
                          "The paper: $\\Delta W_q$ shares more directions across seeds than $\\Delta W_v$."),
        new_code_cell('figures.draw("figure4", tables);'),
        new_markdown_cell("## Figures 6 and 7: the same for the first, a middle and the last layer"),
        new_code_cell('figures.draw("figure6", tables);'),
        new_code_cell('figures.draw("figure7", tables);'),
        new_markdown_cell("## Initialisation control: $\\phi$ on $A$, on $A - A_{init}$ and between the starts"),
        new_code_cell('figures.draw("init_control", tables);'),
        new_markdown_cell("## Footnote 7: the same on $B$'s left singular vectors"),
        new_code_cell('figures.draw("figure3_B", tables);'),
        new_markdown_cell("## The claims, measured (rules in `lora_analysis/verdicts/claims.py`)"),
        new_code_cell('claims_table(tables, keys=["top_direction_shared", "other_directions_noise", "q_higher_rank_than_v"])'),
    ])


def delta_w_vs_w() -> nbformat.NotebookNode:
    return _nb([
        new_markdown_cell(
            "# How does $\\Delta W$ relate to $W$? (Section 7.3, Table 7; Appendix H.3, Figure 8)\n\n"
            "Table 7 projects $W$ onto the $r$-dimensional subspace of $\\Delta W$: $\\lVert U^\\top W V "
            "\\rVert_F$ with $U$, $V$ the top-$r$ left/right singular vectors of $\\Delta W$, beside the same for "
            "$W$'s own top-$r$ directions and a random subspace. The amplification factor is "
            "$\\lVert \\Delta W \\rVert_F / \\lVert U^\\top W V \\rVert_F$ (paper: 21.5 at $r=4$, about 1.9 at "
            "$r=64$)."),
        _params(),
        new_code_cell(SETUP),
        new_markdown_cell("## Table 7 (mean over seeds; every layer)"),
        new_code_cell('figures.tabulate("table7", tables)'),
        new_markdown_cell("## Amplification factor by layer"),
        new_code_cell('figures.draw("table7_amplification", tables);'),
        new_markdown_cell("## Figure 8: $W_q$'s top directions against $\\Delta W_q$'s\n\n"
                          "The paper: the similarity 'barely exceeds 0.2'."),
        new_code_cell('figures.draw("figure8", tables);'),
        new_markdown_cell("## Beyond the paper: $\\Delta W$'s spectrum and effective rank"),
        new_code_cell('figures.draw("spectra", tables);'),
        new_markdown_cell("## The claims, measured"),
        new_code_cell('claims_table(tables, keys=["amplification", "projection_above_random", "w_top_not_amplified"])'),
    ])


def rank_and_weight_types() -> nbformat.NotebookNode:
    return _nb([
        new_markdown_cell(
            "# Which rank, which weights? (Section 7.1 Table 5, Section 7.2 Table 6)\n\n"
            "Table 6: validation metric against $r$ for $\\{W_q, W_v\\}$ (the paper: flat from $r = 1$). "
            "Table 5: one budget of trainable parameters spread over different weight types (the paper: "
            "$\\{W_q, W_v\\}$ and all four are best). The dashed line is the frozen linear probe."),
        _params(),
        new_code_cell(SETUP),
        new_markdown_cell("## Table 6"),
        new_code_cell('figures.tabulate("table6", tables)'),
        new_code_cell('figures.draw("table6", tables);'),
        new_markdown_cell("## Table 5 (the budget run in `RUN_DIR/table5`)"),
        new_code_cell('figures.tabulate("table5", tables)'),
        new_code_cell('figures.draw("table5", tables);'),
        new_markdown_cell("## The claims, measured"),
        new_code_cell('claims_table(tables, keys=["quality_flat_in_rank", "budget_best_sets"])'),
    ])


def your_own_adapters() -> nbformat.NotebookNode:
    return _nb([
        new_markdown_cell(
            "# Analyse your own adapters\n\n"
            "Point `ADAPTER_DIR` at any directory whose sub-directories are PEFT LoRA adapters "
            "(`adapter_config.json` + `adapter_model.safetensors`, as `peft`'s `save_pretrained` writes them, or "
            "a run of `python -m lora.train`). The base model is read from each adapter's "
            "`base_model_name_or_path`. Every figure the adapters allow is drawn: two ranks at one seed give "
            "Figure 3, two seeds at one rank give Figure 4, and so on; the rest say what is missing."),
        _params(PARAMETERS + '\nADAPTER_DIR = RUN_DIR  # your folder of adapters\n'
                             'OUT_DIR = "../figures/your_adapters"  # where the figures and REPORT.md go\n'),
        new_code_cell("%matplotlib inline\nfrom lora_analysis import pipeline\n"
                      "from lora_analysis.load.run import Run\n"
                      "from lora_analysis.render import figures\n"
                      "from lora_analysis.verdicts.claims import claims_table\n\n"
                      "# cache the analysis only in our own run directories, never in someone else's adapters\n"
                      "analysis = pipeline.analyse(Run.open(ADAPTER_DIR), cache=ADAPTER_DIR == RUN_DIR)\n"
                      "tables = analysis.tables\n"
                      "{name: len(table) for name, table in tables.items()}"),
        new_code_cell('figures.draw("figure3", tables);'),
        new_code_cell('figures.draw("figure4", tables);'),
        new_code_cell('figures.draw("figure8", tables);'),
        new_code_cell('figures.tabulate("table7", tables)'),
        new_markdown_cell("## Every figure, the tables and REPORT.md, written to `OUT_DIR`"),
        new_code_cell("written = pipeline.render(analysis, pipeline.judge(analysis), OUT_DIR)  # figures, REPORT.md\n"
                      "claims_table(tables)"),
    ])


def planted_rank() -> nbformat.NotebookNode:
    return _nb([
        new_markdown_cell(
            "# Ground truth: does the analysis recover a planted update?\n\n"
            "A rank-$K$ update $\\Delta W^*$ is planted into one real all-MiniLM-L6-v2 weight, LoRA students of two "
            "ranks and two seeds are trained on real chatterbot-corpus inputs to reproduce it, and the Section 7 "
            "metrics must find $K$ again: $\\phi(i, i) \\approx 1$ for $i \\le K$ between ranks and seeds, then "
            "falling to the random baseline (see `lora_analysis/groundtruth/planted.py`). Everything is seeded."),
        _params(PARAMETERS + '\n# Students\' size: the quick test-suite size by default; the tests shrink it further.\n'
                             'STEPS = 200\n'
                             'TEXTS = 160\n'),
        new_code_cell("%matplotlib inline\nfrom lora_analysis.groundtruth import planted\n"
                      "from lora_analysis.render import figures\n\n"
                      "cfg = planted.LayerConfig(ranks=(8, 16), steps=STEPS, texts=TEXTS)\n"
                      "result = planted.validate_layer(cfg)\n"
                      "print(planted.format_layer(result))"),
        new_code_cell("figures.planted_rank(result);"),
    ])


def dynamics_and_full_finetuning() -> nbformat.NotebookNode:
    return _nb([
        new_markdown_cell(
            "# Beyond Section 7: how the subspace forms, and full fine-tuning as the reference\n\n"
            "**Training snapshots.** `python -m lora.train --snapshot-steps 0 25 50 100 200` saves every adapter's "
            "$A$ and $B$ at those steps (`<adapter>/snapshots/`). Each Section 7 quantity is followed across the "
            "steps, and each claim is judged at every step with its own null, interval and rule: does a verdict "
            "*settle*, or does it still change when training stops?\n\n"
            "**Full fine-tuning.** `--method full` trains the same matrices ($W_q$, $W_v$) in full, with the same "
            "data, steps, seeds and head, and saves $\\Delta W = W_{ft} - W_0$. Section 4.1 *hypothesises* that this "
            "update has a low intrinsic rank; here it is measured, and LoRA's subspace is compared with it (random "
            "null: $E[\\phi(r, r)] = r/d$)."),
        _params(),
        new_code_cell("%matplotlib inline\nfrom lora_analysis import pipeline\n"
                      "from lora_analysis.load.run import Run\n"
                      "from lora_analysis.render import figures\n"
                      "from lora_analysis.tables.full_finetune import effective_ranks\n"
                      "from lora_analysis.verdicts.dynamics import top_overlap_trend, trajectories_table\n"
                      "from lora_analysis.verdicts.full_finetune import full_claims_table, full_quality\n\n"
                      "# every table, the snapshots' and full fine-tuning's included; cached in RUN_DIR/analysis/\n"
                      "analysis = pipeline.analyse(Run.open(RUN_DIR), cache=True)\n"
                      "tables = analysis.tables"),
        new_markdown_cell("## Each quantity against the training step (one line per layer; grey: the random null)"),
        new_code_cell('figures.draw("dynamics", tables);'),
        new_markdown_cell("## When does each claim's verdict settle?"),
        new_code_cell("trajectories_table(analysis.per_step)"),
        new_markdown_cell("## Does the top-direction overlap grow, shrink, or stay flat with training?"),
        new_code_cell("print(top_overlap_trend(analysis.dynamics).text())"),
        new_markdown_cell("## Full fine-tuning's $\\Delta W$: spectrum and effective ranks, layer by layer"),
        new_code_cell('figures.draw("full_spectrum", tables);'),
        new_code_cell('effective_ranks(tables.get("full_spectra"))'),
        new_code_cell('figures.tabulate("table6", tables)'),
        new_markdown_cell("## Validation accuracy beside LoRA's, and LoRA against full fine-tuning"),
        new_code_cell("full_quality(tables[\"quality\"])"),
        new_code_cell("full_claims_table(analysis.full, tables)"),
    ])


NOTEBOOKS = {
    "01_subspace_similarity.ipynb": subspace_similarity,
    "02_delta_w_vs_w.ipynb": delta_w_vs_w,
    "03_rank_and_weight_types.ipynb": rank_and_weight_types,
    "04_your_own_adapters.ipynb": your_own_adapters,
    "05_planted_rank.ipynb": planted_rank,
    "06_dynamics_and_full_finetuning.ipynb": dynamics_and_full_finetuning,
}


def build(out_dir: Path = HERE) -> list[Path]:
    """Write every notebook (unexecuted) into ``out_dir``; returns the paths."""
    from lora.fsio import write_text

    paths = []
    for name, make in NOTEBOOKS.items():
        nb = make()
        nbformat.validate(nb)
        paths.append(write_text(out_dir / name, nbformat.writes(nb)))
    return paths


def inject_parameters(nb: nbformat.NotebookNode, parameters: dict) -> None:
    """Override the ``parameters`` cell's values as papermill does: a cell tagged ``injected-parameters`` right
    after it assigns each name."""
    if not parameters:
        return
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Parameters injected at execution\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    nb.cells.insert(index + 1, new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


def execute(path: Path, *, timeout: int = 1800, parameters: dict | None = None) -> None:
    """Execute one notebook in place (working directory: its folder), atomically; ``parameters`` override the
    values of its ``parameters`` cell (only the names it defines)."""
    from nbclient import NotebookClient

    from lora.fsio import write_text

    nb = nbformat.read(path, as_version=4)
    params_cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    inject_parameters(nb, {k: v for k, v in (parameters or {}).items() if f"{k} =" in params_cell.source})
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    write_text(path, nbformat.writes(nb))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true",
                        help="also execute each notebook in place against RUN_DIR (the default run, $LORA_RUNS_DIR if set)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: this folder)")
    args = parser.parse_args(argv)
    for path in build(args.out):
        if args.execute:
            execute(path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
