"""The analyses: angles against hand-computed vectors (and PEFT's own delta), curves, sweep, tables.

Angle fixture (two LoRA modules, rank 1, lora_alpha 2, r 1 -> scaling 2), updates B @ A:

    epoch    m1 (2x2)            m2 (1x2)
    1        [[1,0],[0,0]]       [[0,0]]
    2        [[1,1],[0,0]]       [[0,1]]
    3 = F    [[1,1],[1,1]]       [[0,2]]

Concatenated and scaled by 2: at s=1, a = ΔP(0→1) = 2(1,0,0,0,0,0), c = ΔP(0→F) = 2(1,1,1,1,0,2),
b = c - a = 2(0,1,1,1,0,2): <a,b> = 0 (90°), cos(a,c) = 1/sqrt(8), cos(b,c) = sqrt(7/8).
At s=2, a = 2(1,1,0,0,0,1), b = 2(0,0,1,1,0,1): cos(a,b) = 1/3, cos(a,c) = cos(b,c) = sqrt(2/3).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from umerge.analysis import angle_analysis, density_sweep, loss_curves, methods_table, read_log, score_curves
from umerge.analysis.angles import FullCheckpoint, LoraCheckpoint, change_angles, run_angles
from umerge.analysis.sweep import command_merger, parse_densities
from umerge.errors import InputError

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
PREFIX = "base_model.model.layers.0"


def deg(cos: float) -> float:
    return math.degrees(math.acos(cos))


def write_adapter(d: Path, m1: tuple[list, list], m2: tuple[list, list], config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (b, a) in (("m1", m1), ("m2", m2)):
        tensors[f"{PREFIX}.{name}.lora_A.weight"] = np.array(a, dtype=np.float32)
        tensors[f"{PREFIX}.{name}.lora_B.weight"] = np.array(b, dtype=np.float32)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    cfg = {"r": 1, "lora_alpha": 2, "peft_type": "LORA"} | (config or {})
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    write_adapter(run / "epoch-1", ([[1], [0]], [[1, 0]]), ([[0]], [[0, 1]]))
    write_adapter(run / "epoch-2", ([[1], [0]], [[1, 1]]), ([[1]], [[0, 1]]))
    write_adapter(run / "epoch-3", ([[1], [1]], [[1, 1]]), ([[2]], [[0, 1]]))
    return run


def test_angles_match_hand_computed_vectors(run_dir: Path) -> None:
    rows, modules = run_angles(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    s1, s2 = rows
    assert s1["angle_0s_sF"] == pytest.approx(90.0, abs=1e-9)
    assert s1["angle_0s_0F"] == pytest.approx(deg(1 / math.sqrt(8)), abs=1e-9)
    assert s1["angle_sF_0F"] == pytest.approx(deg(math.sqrt(7 / 8)), abs=1e-9)
    assert (s1["norm_0s"], s1["norm_sF"], s1["norm_0F"]) == pytest.approx((2.0, 2 * math.sqrt(7), 2 * math.sqrt(8)))
    assert s2["angle_0s_sF"] == pytest.approx(deg(1 / 3), abs=1e-9)
    assert s2["angle_0s_0F"] == pytest.approx(deg(math.sqrt(2 / 3)), abs=1e-9)
    assert s2["angle_sF_0F"] == pytest.approx(deg(math.sqrt(2 / 3)), abs=1e-9)
    # per module at s=1: m2 has no change yet, so its angles with ΔP(0→1) are undefined
    m2 = next(m for m in modules if m["epoch"] == 1 and m["module"].endswith("m2"))
    assert m2["angle_0s_sF"] is None and m2["norm_0s"] == 0.0
    m1 = next(m for m in modules if m["epoch"] == 1 and m["module"].endswith("m1"))
    assert m1["angle_0s_0F"] == pytest.approx(60.0, abs=1e-9)  # (1,0,0,0) vs (1,1,1,1): cos 1/2


def test_scaling_rslora_and_alpha_pattern(tmp_path: Path) -> None:
    # rank 2, alpha 4 -> scaling 2; rsLoRA: 4/sqrt(2); alpha_pattern gives m2 alpha 8 -> 4
    b, a = [[1, 0], [0, 1]], [[1, 0], [0, 1]]  # B @ A = identity (2x2): norm sqrt(2)
    plain = LoraCheckpoint(write_adapter(tmp_path / "p", (b, a), (b, a), {"r": 2, "lora_alpha": 4}))
    rs = LoraCheckpoint(write_adapter(tmp_path / "r", (b, a), (b, a), {"r": 2, "lora_alpha": 4, "use_rslora": True}))
    pat = LoraCheckpoint(write_adapter(tmp_path / "a", (b, a), (b, a), {"r": 2, "lora_alpha": 4, "alpha_pattern": {"m2": 8}}))

    def norm(ck: LoraCheckpoint, m: str) -> float:
        return float(np.sqrt(sum(np.sum(x * x) for x in ck.blocks(f"{PREFIX}.{m}"))))

    assert norm(plain, "m1") == pytest.approx(2 * math.sqrt(2))
    assert norm(rs, "m1") == pytest.approx(4 / math.sqrt(2) * math.sqrt(2))
    assert norm(pat, "m1") == pytest.approx(2 * math.sqrt(2))
    assert norm(pat, "m2") == pytest.approx(4 * math.sqrt(2))


def test_full_checkpoints_against_base(tmp_path: Path) -> None:
    base = {"w": np.array([[1.0, 1.0]], dtype=np.float32), "v": np.array([2.0, 0.0], dtype=np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for k, (w, v) in {1: ([[2, 1]], [2, 0]), 2: ([[2, 2]], [2, 1])}.items():
        (tmp_path / "run" / f"epoch-{k}").mkdir(parents=True)
        save_file({"w": np.array(w, dtype=np.float32), "v": np.array(v, dtype=np.float32)},
                  str(tmp_path / "run" / f"epoch-{k}" / "model.safetensors"))
    # ΔP(0→1) = (1,0 | 0,0), ΔP(0→F) = (1,1 | 0,1), ΔP(1→F) = (0,1 | 0,1)
    whole, _ = change_angles(FullCheckpoint(tmp_path / "run/epoch-1", tmp_path / "base.safetensors"),
                             FullCheckpoint(tmp_path / "run/epoch-2", tmp_path / "base.safetensors"))
    assert whole["angle_0s_sF"] == pytest.approx(90.0)
    assert whole["angle_0s_0F"] == pytest.approx(deg(1 / math.sqrt(3)))
    assert whole["angle_sF_0F"] == pytest.approx(deg(2 / math.sqrt(6)))
    with pytest.raises(InputError, match="needs --base"):
        run_angles(tmp_path / "run")


def test_angle_figure_and_files(run_dir: Path, tmp_path: Path) -> None:
    paths = angle_analysis({"model1": run_dir}, tmp_path / "out")
    assert paths["figure"].read_bytes()[:8] == PNG
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[0]["angle_0s_sF"]) == pytest.approx(90.0)
    saved = json.loads(paths["json"].read_text())["model1"]
    assert saved["rows"][1]["epoch"] == 2 and saved["rows"][0]["dim"] == 6  # updates B @ A: m1 2 x 2, m2 1 x 2
    assert saved["s"] == 1 and saved["s_rule"].startswith("first epoch")  # no training log here
    assert paths["modules_csv"].is_file()
    given = json.loads(angle_analysis({"model1": run_dir}, tmp_path / "out2", s=2)["json"].read_text())["model1"]
    assert given["s"] == 2 and given["s_rule"] == "given" and given["at_s"]["epoch"] == 2
    with pytest.raises(InputError, match="no checkpoint for epoch s=3"):
        angle_analysis({"model1": run_dir}, tmp_path / "out3", s=3)


def test_null_band_matches_random_directions() -> None:
    """Independent check by simulation: random Gaussian directions in R^D with the given norms."""
    from umerge.analysis.angles import null_band

    dim, a, b = 2000, 3.0, 1.5
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, dim))
    y = rng.standard_normal((4000, dim))
    x *= a / np.linalg.norm(x, axis=1, keepdims=True)
    y *= b / np.linalg.norm(y, axis=1, keepdims=True)
    c = x + y

    def ang(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        cos = np.sum(u * v, 1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
        return np.degrees(np.arccos(np.clip(cos, -1, 1)))

    band = null_band(a, b, dim)
    for key, sample in (("angle_0s_sF", ang(x, y)), ("angle_0s_0F", ang(x, c)), ("angle_sF_0F", ang(y, c))):
        lo, hi = np.percentile(sample, [2.5, 97.5])
        assert band[key][0] == pytest.approx(lo, abs=0.15), key
        assert band[key][1] == pytest.approx(hi, abs=0.15), key
    assert band["angle_0s_sF"][0] < 90 < band["angle_0s_sF"][1]
    with pytest.raises(InputError, match="dimension"):
        null_band(1.0, 1.0, 1)


def test_plateau_epoch_is_where_the_forget_loss_stops_moving(tmp_path: Path) -> None:
    from umerge.analysis.angles import plateau_epoch

    # per-epoch means 1, 5, 8.6, 9.0, 9.1: total change 8.1; the step 8.6 -> 9.0 (0.4 <= 0.81) is the first small one
    means = [1.0, 5.0, 8.6, 9.0, 9.1]
    rows = [{"type": "step", "step": 2 * k + j + 1, "epoch_progress": k + (j + 1) / 2, "loss": 1.0,
             "forget_nll": m + (0.1 if j else -0.1)} for k, m in enumerate(means) for j in range(2)]
    log = write_log(tmp_path / "run" / "train_log.jsonl", rows)
    assert plateau_epoch(log) == 3
    assert plateau_epoch(log, tol=0.01) == 4  # never flat enough: the last epoch before the end
    one = write_log(tmp_path / "one" / "train_log.jsonl", rows[:2])
    assert plateau_epoch(one) is None
    # a flat start (warmup) is not the plateau: means 1, 1.05, 5, 9, 9.1 -> s = 4
    late = [dict(r, forget_nll=[1.0, 1.05, 5.0, 9.0, 9.1][int(r["epoch_progress"] - 0.5)]) for r in rows]
    assert plateau_epoch(write_log(tmp_path / "late" / "train_log.jsonl", late)) == 4


def test_angle_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no epoch"):
        run_angles(tmp_path)
    write_adapter(tmp_path / "one" / "epoch-1", ([[1]], [[1]]), ([[1]], [[1]]))
    with pytest.raises(InputError, match="only the final"):
        run_angles(tmp_path / "one")


@pytest.mark.peft
@pytest.mark.train
def test_lora_delta_matches_peft(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Linear(6, 5, bias=False)
            self.k = torch.nn.Linear(6, 3, bias=False)

    torch.manual_seed(0)
    for rslora in (False, True):
        model = peft.get_peft_model(
            Net(), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q", "k"], use_rslora=rslora, alpha_pattern={"k": 5})
        )
        for name, p in model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p)
        out = tmp_path / f"peft-{rslora}"
        model.save_pretrained(str(out))
        ck = LoraCheckpoint(out)
        for mod_name in ("q", "k"):
            layer = dict(model.named_modules())[f"base_model.model.{mod_name}"]
            expected = layer.get_delta_weight("default").detach().double().numpy()
            name = next(n for n in ck.names() if n.endswith(f".{mod_name}"))
            got = np.concatenate(list(ck.blocks(name)))
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- curves
def write_log(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loss_curves_trainer_format_and_aliases(tmp_path: Path) -> None:
    trainer = write_log(tmp_path / "model1" / "train_log.jsonl", [
        {"type": "step", "step": s, "epoch": 1, "epoch_progress": s / 4, "loss": 1.0 / s, "npo": 0.5 / s,
         "kl": 0.01 * s, "gdr": 2.0, "lr": 1e-4, "grad_norm": 0.3} for s in range(1, 5)
    ] + [{"type": "eval", "epoch": 1, "step": 4, "task_aggregate": 0.5}])
    other = write_log(tmp_path / "other.jsonl", [
        {"global_step": s, "total_loss": 3.0 - s, "npo_loss": 1.0, "retain_nll": 0.7, "learning_rate": 2e-4}
        for s in range(1, 4)
    ] + [{"note": "not a step"}])
    steps, evals = read_log(other)
    assert [s["loss"] for s in steps] == [2.0, 1.0, 0.0] and steps[0]["gdr"] == 0.7 and steps[0]["lr"] == 2e-4
    assert evals == []
    paths = loss_curves([trainer, other], tmp_path / "out")
    assert paths["figure"].read_bytes()[:8] == PNG
    rows = list(csv.DictReader(paths["csv"].open()))
    assert {r["label"] for r in rows} == {"model1", "other"}
    m1 = [r for r in rows if r["label"] == "model1"]
    assert len(m1) == 4 and float(m1[1]["loss"]) == 0.5 and float(m1[3]["epoch"]) == 1.0
    with pytest.raises(InputError, match="no step or eval rows"):
        loss_curves([write_log(tmp_path / "empty.jsonl", [{"x": 1}])], tmp_path / "out2")


def test_score_curves_from_log_and_reports(tmp_path: Path) -> None:
    from umerge.evaluate import build_report

    log = write_log(tmp_path / "m" / "train_log.jsonl", [
        {"type": "step", "step": 1, "loss": 1.0},
        {"type": "eval", "epoch": 1, "step": 1, "task_aggregate": 0.2, "forget_regurgitation": 0.9},
        {"type": "eval", "epoch": 2, "step": 2, "task_aggregate": 0.4, "forget_regurgitation": 0.5},
    ])
    gens = [{"id": '"a"sc1', "task": "Task1", "split": s, "input": "p", "output": "one two three four",
             "generation": g} for s, g in (("forget", "one"), ("retain", "one two three four"))]
    gens += [{"id": '"a"qa0', "task": "Task1", "split": s, "input": "q", "output": "x", "generation": "x"}
             for s in ("forget", "retain")]
    rep = build_report(gens)
    rep.save(tmp_path / "r1.json")
    paths = score_curves({"m": log, "reports": {1: tmp_path / "r1.json", 2: rep}}, tmp_path / "out")
    assert paths["figure"].read_bytes()[:8] == PNG
    rows = list(csv.DictReader(paths["csv"].open()))
    m = [r for r in rows if r["label"] == "m"]
    assert [float(r["task_aggregate"]) for r in m] == [0.2, 0.4]
    r = [r for r in rows if r["label"] == "reports"]
    assert float(r[0]["forget_regurgitation"]) == pytest.approx(0.25)  # recall 1/4
    assert float(r[0]["task_aggregate"]) == rep.task_aggregate == 0.0  # forget knowledge 1 -> 0


def test_task_curves_per_split_task_and_metric_from_epoch_0(tmp_path: Path) -> None:
    from umerge.analysis.curves import task_curves
    from umerge.evaluate import build_report
    from umerge.evaluate.run import per_task_scores

    gens = [{"id": f'"{t}"sc1', "task": t, "split": s, "input": "p", "output": "one two three four",
             "generation": g} for t, g in (("Task1", "one"), ("Task2", "one two")) for s in ("forget", "retain")]
    gens += [{"id": f'"{t}"qa0', "task": t, "split": s, "input": "q", "output": "x", "generation": "x"}
             for t in ("Task1", "Task2") for s in ("forget", "retain")]
    scores = per_task_scores(build_report(gens))
    assert scores["forget/Task1/regurgitation"] == pytest.approx(0.25)  # ROUGE-L recall 1/4
    assert scores["retain/Task2/regurgitation"] == pytest.approx(0.5)
    assert scores["forget/Task2/knowledge"] == 1.0
    log = write_log(tmp_path / "m" / "train_log.jsonl", [
        {"type": "eval", "epoch": 0, "step": 0, **{k: 1.0 for k in scores}},
        {"type": "step", "step": 1, "loss": 1.0},
        {"type": "eval", "epoch": 1, "step": 1, **scores},
    ])
    paths = task_curves({"m": log}, tmp_path / "out")
    assert paths["figure"].read_bytes()[:8] == PNG
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 2 * len(scores)  # epochs 0 and 1, every split x task x metric
    first = [r for r in rows if (r["epoch"], r["split"], r["task"], r["metric"]) == ("1.0", "forget", "Task1", "regurgitation")]
    assert float(first[0]["value"]) == pytest.approx(0.25)
    with pytest.raises(InputError, match="no per-task scores"):
        task_curves({"m": write_log(tmp_path / "e" / "train_log.jsonl", [{"type": "eval", "epoch": 1, "x": 1.0}])},
                    tmp_path / "o2")


# ---------------------------------------------------------------- sweep and methods
def test_density_sweep_with_a_fake_merge(tmp_path: Path) -> None:
    called: list[float] = []

    def merge(density: float, out: Path) -> Path:
        called.append(density)
        out.mkdir(parents=True)
        (out / "model.txt").write_text(str(density))
        return out

    def score(model: Path) -> dict:
        d = float((model / "model.txt").read_text())
        return {"task_aggregate": d, "mia_score": 1 - d, "mmlu": 0.5, "aggregate": (d + 1 - d + 0.5) / 3}

    res = density_sweep(merge, score, tmp_path / "sweep", densities=parse_densities("0.1:1.0:0.1"), progress=False)
    assert called == pytest.approx([0.1 * i for i in range(1, 11)])
    rows = list(csv.DictReader(res["csv"].open()))
    assert [float(r["density"]) for r in rows] == pytest.approx(called)
    assert [float(r["task_aggregate"]) for r in rows] == pytest.approx(called)
    assert res["figure"].read_bytes()[:8] == PNG
    assert not (tmp_path / "sweep" / "merged").exists()  # merged models removed after scoring
    assert parse_densities("0.2, 0.8,1") == [0.2, 0.8, 1.0]
    with pytest.raises(InputError):
        parse_densities("0,0.5")


def test_command_merger(tmp_path: Path) -> None:
    script = "import sys, pathlib; p = pathlib.Path(sys.argv[2]); p.mkdir(parents=True); (p / 'd').write_text(sys.argv[1])"
    merge = command_merger(f"{sys.executable} -c \"{script}\" {{density}} {{out}}")
    out = merge(0.3, tmp_path / "with space" / "m")
    assert (out / "d").read_text() == "0.3"
    failing = command_merger(f"{sys.executable} -c \"import sys; sys.exit('boom {{density}}')\" {{density}} {{out}}")
    with pytest.raises(InputError, match="boom"):
        failing(0.5, tmp_path / "x")
    with pytest.raises(InputError, match="must contain"):
        command_merger("umerge ties --density 0.5")


def test_methods_table(tmp_path: Path) -> None:
    table = methods_table(
        {"ties": {"task_aggregate": 0.9, "mia_score": 0.8, "mia_auc": 0.4, "mmlu": 0.5, "aggregate": 0.7333},
         "linear": {"task_aggregate": 0.5}},
        tmp_path / "m",
    )
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Method | Task Aggregate | MIA score / AUC | MMLU | Aggregate |")
    assert lines[2].startswith("| ties | 0.9000 | 0.8000 / 0.4000 | 0.5000 | 0.7333 |")
    assert lines[3].startswith("| linear | 0.5000 | n/a | n/a | n/a |")
    assert (tmp_path / "m" / "methods.png").read_bytes()[:8] == PNG
    assert (tmp_path / "m" / "methods.md").read_text() == table


def test_cli_analyze(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from umerge.cli import main

    main(["analyze", "angles", str(run_dir), "-o", str(tmp_path / "a")])
    assert (tmp_path / "a" / "angles.png").is_file()
    main(["analyze", "angles", str(run_dir), "--s", "2", "-o", str(tmp_path / "a2")])
    assert json.loads((tmp_path / "a2" / "angles.json").read_text())["run"]["s"] == 2
    scores = write_log(tmp_path / "t" / "train_log.jsonl", [
        {"type": "eval", "epoch": 0, "step": 0, "forget/Task1/regurgitation": 1.0},
        {"type": "eval", "epoch": 1, "step": 4, "forget/Task1/regurgitation": 0.25}])
    main(["analyze", "task-curves", str(scores), "-o", str(tmp_path / "t_out")])
    assert (tmp_path / "t_out" / "task_curves.png").is_file()
    log = write_log(tmp_path / "r" / "train_log.jsonl", [{"type": "step", "step": 1, "loss": 1.0}])
    main(["analyze", "loss-curves", str(log), "-o", str(tmp_path / "l")])
    assert (tmp_path / "l" / "loss_curves.csv").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "methods", "bad-entry", "-o", str(tmp_path / "m")])
    assert exc.value.code == 2
    assert "expected KEY=PATH" in capsys.readouterr().err


def test_cli_density_sweep_and_methods_from_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from umerge.cli import main
    from umerge.evaluate import build_report

    paths = []
    for i, gen in enumerate(("one", "one two three four")):
        rows = [{"id": '"a"sc1', "task": "Task1", "split": s, "input": "p", "output": "one two three four",
                 "generation": g} for s, g in (("forget", gen), ("retain", "one two"))]
        rows += [{"id": '"a"qa0', "task": "Task1", "split": s, "input": "q", "output": "x", "generation": "y"}
                 for s in ("forget", "retain")]
        rows[-1]["generation"] = "x"
        p = build_report(rows, mmlu=0.5).save(tmp_path / f"r{i}.json")
        paths.append(p)
    main(["analyze", "density-sweep", "--report", f"0.5={paths[0]}", "--report", f"1.0={paths[1]}",
          "-o", str(tmp_path / "s")])
    rows = list(csv.DictReader((tmp_path / "s" / "density_sweep.csv").open()))
    # forget recall 1/4 -> 3/4 inverted; forget knowledge 0 -> 1; retain recall 1/2; retain knowledge 1
    assert float(rows[0]["task_aggregate"]) == pytest.approx(4 / (4 / 3 + 1 + 2 + 1))
    assert float(rows[1]["task_aggregate"]) == 0.0  # forget fully regurgitated: 1 - 1 = 0
    capsys.readouterr()
    main(["analyze", "methods", f"ties={paths[0]}", f"linear={paths[1]}", "-o", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert "| ties | 0.7500 | n/a | 0.5000 | n/a |" in out
