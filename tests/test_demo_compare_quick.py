"""`umerge demo --quick --compare-methods` with two cheap methods, end to end through the CLI.

grad_diff has a retain term (preset, under variant, TIES merge), undial's preset has none (preset
only); npo_gdr_klr is not listed, so the section holds exactly those four rows. Checks that the
section and report.json's "method_comparison" exist, that every number of report.md's table equals
report.json's (parsed back from the Markdown), that the rows' scores are their own evaluation
reports' values, that the under variant was trained with the documented weights, and that the
criteria in the table are the ones judged on report.json's numbers by thresholds written here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the demo needs the train extra (torch)")
pytest.importorskip("peft", reason="the demo needs the train extra (peft)")

from test_demo_quick import _num, _same, _section  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("mia_auc", "task_aggregate", "mmlu", "aggregate", "forget_regurgitation", "retain_regurgitation",
           "forget_knowledge", "forget_knowledge_int4")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("demo") / "compare"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "umerge.cli", "demo", "--quick", "--compare-methods",
                           "--set", "compare_methods=grad_diff,undial", "-o", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return out, rep, (out / "report.md").read_text(encoding="utf-8")


def test_the_section_has_every_row(run: tuple[Path, dict, str]) -> None:
    out, rep, md = run
    c = rep["method_comparison"]
    assert rep["config"]["compare_methods"] == ["grad_diff", "undial"] and "--compare-methods" in rep["command"]
    assert [(r["method"], r["variant"]) for r in c["rows"]] == [
        ("grad_diff", "preset"), ("grad_diff", "under"), ("grad_diff", "TIES merge"), ("undial", "preset")]
    preset, under = c["rows"][0], c["rows"][1]
    assert (preset["weights"]["forget_weight"], preset["weights"]["retain_weight"], preset["batch_size"]) == (1.0, 1.0, 1)
    assert (under["weights"]["forget_weight"], under["weights"]["retain_weight"], under["batch_size"]) == (0.75, 2.0, 2)
    assert preset["steps"] > under["steps"] > 0  # batch 2 halves the optimizer steps
    for r in c["rows"]:
        ev = json.loads((out / r["report"]).read_text(encoding="utf-8"))
        assert r["mia_auc"] == ev["mia_loss_acc"] and r["task_aggregate"] == ev["harmonic-mean-task-aggregate"]
        assert isinstance(r["forget_knowledge_int4"], float)
    assert "unlearning methods compared" in rep["timings_s"]


def test_report_md_numbers_equal_report_json(run: tuple[Path, dict, str]) -> None:
    _, rep, md = run
    c = rep["method_comparison"]
    lines = [ln for ln in _section(md, "Unlearning methods compared").splitlines() if ln.startswith("| ")]
    body = [[x.strip() for x in ln.strip().strip("|").split("|")] for ln in lines[1:]]  # lines[0]: the header
    assert len(body) == 1 + len(c["rows"])
    assert body[0][:2] == ["vanilla", "—"]
    assert all(_same(_num(cell), c["vanilla"][k]) for cell, k in zip(body[0][2:], COLUMNS))
    assert c["vanilla"]["mia_auc"] == rep["scores"]["vanilla"]["mia_auc"]
    for cells, r in zip(body[1:], c["rows"]):
        assert cells[:2] == [r["method"], r["variant"]]
        assert all(_same(_num(cell), r[k]) for cell, k in zip(cells[2:10], COLUMNS)), cells
        verdicts = cells[10:]
        crit = r["criteria"]
        want = ["yes" if crit[k] else "no" for k in ("unlearns", "keeps_utility", "survives_int4")]
        want += (["yes" if crit[k] else "no" for k in ("balanced", "above_both")] if r["variant"] == "TIES merge"
                 else ["—", "—"])
        assert verdicts == want


def test_criteria_follow_the_numbers(run: tuple[Path, dict, str]) -> None:
    """The thresholds as the brief states them, applied here to report.json's numbers."""
    _, rep, _ = run
    c = rep["method_comparison"]
    v = c["vanilla"]
    rows = {(r["method"], r["variant"]): r for r in c["rows"]}
    for r in c["rows"]:
        crit = r["criteria"]
        assert crit["unlearns"] == (r["forget_regurgitation"] <= v["forget_regurgitation"] - 0.1)
        assert crit["keeps_utility"] == (r["mmlu"] >= 0.8 * v["mmlu"])
        assert crit["survives_int4"] == (r["forget_knowledge_int4"] - r["forget_knowledge"] <= 0.05)
    merge, p, u = rows[("grad_diff", "TIES merge")], rows[("grad_diff", "preset")], rows[("grad_diff", "under")]
    assert merge["criteria"]["balanced"] == (abs(merge["mia_auc"] - 0.5) < min(abs(p["mia_auc"] - 0.5),
                                                                                abs(u["mia_auc"] - 0.5)))
    assert merge["criteria"]["above_both"] == (merge["aggregate"] > max(p["aggregate"], u["aggregate"]))
