"""`umerge demo --quick` end to end through the CLI, as CI runs it (needs the `train` extra).

Checks that the run succeeds and prints the report path, that report.md has every table and figure,
that every score printed in report.md's tables equals report.json's value (parsed back from the
Markdown, not re-rendered), and that the calibration (the vanilla model memorises) holds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the demo needs the train extra (torch)")
pytest.importorskip("peft", reason="the demo needs the train extra (peft)")

pytestmark = [pytest.mark.train, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _section(md: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", md, flags=re.M | re.S)
    assert m, f"report.md has no section '## {title}'"
    return m.group(1)


def _table_rows(section: str) -> list[list[str]]:
    """Body rows of every Markdown table in a section, as lists of cell strings."""
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not re.match(r"^\|[-| ]+\|$", line):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [r for r in rows if r[0] not in ("Model", "Method", "Density", "Round", "Stage")]


def _num(cell: str) -> float | None:
    return None if cell == "n/a" else float(cell)


def _mia(cell: str) -> tuple[float | None, float | None]:
    if cell == "n/a":
        return None, None
    a, b = cell.split(" / ")
    return float(a), float(b)


def _same(cell_value: float | None, json_value: float | None) -> bool:
    if json_value is None:
        return cell_value is None
    return cell_value is not None and abs(cell_value - round(float(json_value), 4)) < 1e-9


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "quick"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "umerge.cli", "demo", "--quick", "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_cli_prints_report_path_and_progress(demo_run: tuple[Path, str]) -> None:
    out, stdout = demo_run
    assert f"report: {out / 'report.md'}" in stdout
    assert (out / "report.md").is_file() and (out / "report.json").is_file()


def test_report_has_every_table_and_figure(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    md = (out / "report.md").read_text(encoding="utf-8")
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for title in ("Finding", "Table 1", "Table 2", "Density sweep", "Figures", "Calibration", "Setup"):
        _section(md, title)
    for key in ("loss_curves", "task_curves", "score_curves", "angles", "density_sweep"):
        rel = rep["figures"][key]
        assert f"]({rel})" in md
        png = out / rel
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["command"] in md and "--quick" in rep["command"]
    assert "Seeds:" in md


def test_the_paper_figures_have_their_numbers_in_report_json(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    data = rep["figure_data"]
    # Figure 2: every split x task x metric for both presets, from epoch 0 to the last epoch
    epochs = rep["unlearning"]["model1"]["config"]["epochs"]
    tasks = {r["task"] for r in data["task_curves"]}
    assert len(tasks) == 3
    for label in ("model1", "model2"):
        rows = [r for r in data["task_curves"] if r["label"] == label]
        assert sorted({r["epoch"] for r in rows}) == [float(k) for k in range(epochs + 1)]
        assert len(rows) == (epochs + 1) * 2 * 3 * 2
    # epoch 0 is the starting model: the vanilla model's scores (up to the hook's row subset)
    # Figure 3: NPO alone beside both presets, same number of steps as model1
    labels = {r["label"] for r in data["loss_curves"]}
    assert labels == {"model1 (NPO+GDR+KLR)", "NPO alone (model1's budget)", "model2 (NPO+GDR+KLR)"}
    npo_only = [r for r in data["loss_curves"] if r["label"].startswith("NPO alone")]
    assert len(npo_only) == rep["unlearning"]["model1"]["steps"] == rep["unlearning"]["npo-only"]["steps"]
    assert all(r["kl"] is not None for r in npo_only)  # logged, though weighted 0
    # Figure 4: a null band at every s, and the chosen s
    for label in ("model1", "model2"):
        a = data["angles"][label]
        assert a["s"] in [r["epoch"] for r in a["rows"]] and a["s_rule"]
        for r in a["rows"]:
            assert r["null_angle_0s_sF_lo"] < 90 < r["null_angle_0s_sF_hi"] and r["dim"] > 1000
    # Figure 5: the sweep's rows hold the AUC as well as the score
    assert all("mia_auc" in r and "mia_score" in r for r in rep["sweep"])


def test_every_model_and_every_table2_row_is_there(demo_run: tuple[Path, str]) -> None:
    """Nothing is left out: Table 1 has all five models, Table 2 every method on both paths, once."""
    out, _ = demo_run
    md = (out / "report.md").read_text(encoding="utf-8")
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["table1"] == ["vanilla", "model1", "model2", "merge-ties-factorwise", "merge-ties-full"]
    paths = ("factor-wise (PEFT semantics)", "full update")
    want = sorted((m, p) for m in rep["config"]["methods"] for p in paths)
    assert sorted((row["method"], row["path"]) for row in rep["table2"]) == want
    assert set(rep["config"]["methods"]) == {"linear", "dare_linear", "dare_ties", "magnitude_prune", "ties"}
    assert "missing" not in rep and "Not available" not in md and "skipped" not in md


def test_table_numbers_equal_report_json(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    md = (out / "report.md").read_text(encoding="utf-8")
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))

    t1 = _table_rows(_section(md, "Table 1"))
    names = rep["table1"]
    assert len(t1) == 2 * len(names) and {"vanilla", "model1", "model2", "merge-ties-factorwise"} <= set(names)
    for cells, name in zip(t1[: len(names)], names):
        s = rep["scores"][name]
        mia_score, mia_auc = _mia(cells[2])
        assert _same(_num(cells[1]), s["task_aggregate"]) and _same(mia_score, s["mia_score"])
        assert _same(mia_auc, s["mia_auc"]) and _same(_num(cells[3]), s["mmlu"]) and _same(_num(cells[4]), s["aggregate"])
        assert _same(_num(cells[5]), s["forget_knowledge_int4"])
    for cells, name in zip(t1[len(names):], names):
        s = rep["scores"][name]
        keys = ("forget_regurgitation", "forget_knowledge", "retain_regurgitation", "retain_knowledge")
        assert all(_same(_num(c), s[k]) for c, k in zip(cells[1:], keys))

    t2 = _table_rows(_section(md, "Table 2"))
    assert len(t2) == len(rep["table2"]) >= 5
    for cells, row in zip(t2, rep["table2"]):
        assert cells[0] == row["method"] and cells[1] == row["path"]
        mia_score, mia_auc = _mia(cells[3])
        assert _same(_num(cells[2]), row["task_aggregate"]) and _same(mia_score, row["mia_score"])
        assert _same(mia_auc, row["mia_auc"]) and _same(_num(cells[4]), row["mmlu"]) and _same(_num(cells[5]), row["aggregate"])

    sweep = _table_rows(_section(md, "Density sweep"))
    assert len(sweep) == len(rep["sweep"]) == len(rep["config"]["sweep_densities"])
    for cells, row in zip(sweep, rep["sweep"]):
        assert _same(_num(cells[0]), row["density"]) and _same(_num(cells[1]), row["task_aggregate"])
        assert _same(_num(cells[3]), row["mmlu"]) and _same(_num(cells[4]), row["aggregate"])

    geo = [r for r in _table_rows(_section(md, "Finding")) if r[0] != "norm Δ model1"]
    g = rep["factorwise_update"]
    keys = ("norm_model1", "norm_model2", "norm_mean", "norm_merged", "cos_merged_mean", "cos_merged_model1",
            "cos_merged_model2", "cos_model1_model2")
    assert len(geo) == 1 and all(_same(_num(c), g[k]) for c, k in zip(geo[0], keys))

    # the headline scores are the evaluation's own report.json values (no copy drift)
    for name in names:
        ev = json.loads((out / rep["scores"][name]["report"]).read_text(encoding="utf-8"))
        assert rep["scores"][name]["task_aggregate"] == ev["harmonic-mean-task-aggregate"]
        assert rep["scores"][name]["mia_auc"] == ev["mia_loss_acc"]


def test_table1_has_the_forget_knowledge_after_int4(demo_run: tuple[Path, str]) -> None:
    """The quantization probe: a number for every model, from the forget split's QA rows, with the
    group size capped at the tiny model's 64 input features and stated in the report."""
    out, _ = demo_run
    md = (out / "report.md").read_text(encoding="utf-8")
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    p = rep["quantization_probe"]
    assert (p["scheme"], p["bits"], p["group_size"], p["group_size_cap"]) == ("int4", 4, 64, 128)
    assert p["tensors"] == 2 * 7 and p["forget_qa_rows"] > 0
    for name in rep["table1"]:
        v = rep["scores"][name]["forget_knowledge_int4"]
        assert isinstance(v, float) and 0.0 <= v <= 1.0 and p["forget_knowledge_int4"][name] == v, name
    section = _section(md, "Table 1")
    assert "| Model | Task Aggregate | MIA score / AUC | MMLU | Aggregate | forget knowledge after int4 |" in section
    assert "groups of 64 input columns, not 128" in section and "arXiv:2410.16454" in section
    assert "quantization probe (forget knowledge after int4)" in rep["timings_s"]


def test_calibration_holds_and_findings_are_stated(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    cal = rep["calibration"]
    last = cal["rounds"][-1]
    assert cal["passed"] is True
    assert last["forget_regurgitation"] >= 0.8 and last["retain_regurgitation"] >= 0.8
    f = rep["findings"]
    assert f["available"] is True
    hi1 = f["judgement"]["intervals"]["model1"][1]
    assert f["judgement"]["model1_over_forgets"] == (hi1 < 0.5)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert f["sentence"] in md  # the finding is the criteria module's sentence, printed as is
    assert all(text in md for text in f["criteria"].values())
