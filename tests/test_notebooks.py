"""Runs each notebook in colab/ top to bottom in a fresh Jupyter kernel (nbclient) and checks
numbers it computed.

Every notebook ends by building a dict `results`; the test appends one cell that prints it as
JSON, so the checks read the notebook's own values rather than scraping its output. The kernel
runs with the repository on PYTHONPATH (as `pip install -e .` would give), in a temporary working
directory, with one CPU device (the 8 simulated devices of conftest.py are removed from
XLA_FLAGS: a Colab CPU runtime has one, and the notebooks are sized for it) and XLA's backend
optimisation off (compile time dominates at these shapes; timings the notebooks print in a test
run are therefore not representative).
"""

from __future__ import annotations

import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = ("quickstart", "hybrid_ssm", "surgery", "dpo")
MARK = "NOTEBOOK_RESULTS "


def kernel_env(tmpdir=None) -> dict:
    """The kernel's environment; `tmpdir` becomes its TMPDIR, so the run directories the
    notebooks make with `tempfile` land in pytest's tmp_path (cleaned by pytest)."""
    env = dict(os.environ)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    # Tiny shapes: compiling dominates, so skip XLA's backend optimisation (as other tests do).
    env["XLA_FLAGS"] = " ".join(flags.split() + ["--xla_backend_optimization_level=0"])
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("MPLBACKEND", None)  # the kernel's inline backend: figures become PNG outputs
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def load(name: str):
    path = os.path.join(COLAB, f"{name}.ipynb")
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing")
    return nbformat.read(path, as_version=4)


def run_notebook(name: str, workdir) -> dict:
    """Executes colab/<name>.ipynb; returns its `results` dict plus `_figures`, the number of PNG
    outputs it drew. A cell error fails the test with the cell's traceback (nbclient's
    CellExecutionError)."""
    nb = load(name)
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import json as _json\nprint({MARK!r} + _json.dumps(results, default=float))"))
    client = NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute(env=kernel_env(workdir))
    figures = sum("image/png" in output.get("data", {}) for cell in nb.cells
                  if cell.cell_type == "code" for output in cell.outputs)
    for output in nb.cells[-1].outputs:
        if output.get("output_type") == "stream":
            for line in output.get("text", "").splitlines():
                if line.startswith(MARK):
                    return {**json.loads(line[len(MARK):]), "_figures": figures}
    raise AssertionError(f"{name}.ipynb: the results cell printed no {MARK.strip()} line")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean_and_opens_with_the_install_cell(name):
    nb = load(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name}.ipynb has no code cell"
    assert "find_spec(\"jaxlm\")" in code[0].source and "pip" in code[0].source
    with_outputs = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert with_outputs == [], f"{name}.ipynb: code cells {with_outputs} have stored outputs"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    nbformat.validate(nb)


def test_quickstart(tmp_path):
    r = run_notebook("quickstart", tmp_path)
    assert r["final_loss"] < r["initial_loss"] - 0.5, r
    assert r["eval_loss"] < r["unigram_loss"] + 0.25, r
    assert all(n > 0 for n in r["generated_tokens"]), r
    assert r["_figures"] >= 1, r


def test_hybrid_ssm(tmp_path):
    r = run_notebook("hybrid_ssm", tmp_path)
    assert max(r["scan_error"].values()) < 1e-5, r["scan_error"]
    assert set(r["scan_error"]) == {"chunked", "associative", "sequential"}
    assert r["final_loss"] < r["initial_loss"] - 0.5, r
    assert r["cached_equals_uncached"] is True and r["generated_tokens"] > 0, r
    assert r["_figures"] >= 1, r


def test_surgery(tmp_path):
    r = run_notebook("surgery", tmp_path)
    assert r["upscaled_layers"] == 6, r
    assert r["base_loss_continued"] < r["base_loss"], r
    assert r["upscaled_loss_continued"] < r["upscaled_loss_step0"], r
    for method in ("linear", "slerp"):  # the end points of a merge are the fine-tunes themselves
        assert abs(r[f"{method}_loss"]["0.0"] - r["finetune_a_loss"]) < 1e-4, r
        assert abs(r[f"{method}_loss"]["1.0"] - r["finetune_b_loss"]) < 1e-4, r
        assert r[f"{method}_loss"]["0.5"] < max(r["finetune_a_loss"], r["finetune_b_loss"]), r
    assert r["_figures"] >= 1, r


def test_dpo(tmp_path):
    r = run_notebook("dpo", tmp_path)
    assert r["sft_eval_loss"] < r["sft_first_loss"] - 1.0, r
    log2 = 0.6931471805599453  # the DPO loss of a policy equal to its reference
    assert r["dpo_last_loss"] < log2 and r["dpo_heldout_loss"] < log2 - 0.02, r
    assert r["heldout_pairs"] >= 20, r
    assert 0.0 <= r["dpo_heldout_reward_accuracy"] <= 1.0, r
    assert r["_figures"] >= 1, r
