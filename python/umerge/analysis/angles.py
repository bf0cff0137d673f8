"""Angles between parameter-change vectors over training (the paper's Figure 4).

For a run with checkpoints after epochs 1..K (``OUT/epoch-{k}/``) and final weights F (the last
epoch unless given), the parameter change from the start to epoch s is ``ΔP(0→s) = W_s - W_0``,
from s to the end ``ΔP(s→F) = W_F - W_s``, and overall ``ΔP(0→F) = W_F - W_0``. Each is one
vector: the concatenation of every changed module, flattened. Reported per epoch s < K, in
degrees: ``angle(ΔP(0→s), ΔP(s→F))``, ``angle(ΔP(0→s), ΔP(0→F))``, ``angle(ΔP(s→F), ΔP(0→F))``
with ``angle(x, y) = arccos(<x, y> / (|x| |y|))``, plus the three norms and the dimension. Nearly
orthogonal ΔP(0→s) and ΔP(s→F) would mean later training moves in directions unrelated to the early
updates -- but two random directions in a high dimension are nearly orthogonal too, so every angle
comes with the band that random directions of the same dimension and norms give (`null_band`), and
the epoch s the paper reads off is the one where the forget loss plateaus (`plateau_epoch`).

Checkpoints:

* **LoRA adapters** (``adapter_model.safetensors`` + ``adapter_config.json``, PEFT layout): the
  change of a module is ``scaling * B @ A`` with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
  rsLoRA; ``alpha_pattern`` entries matched on the module name as PEFT does; r read from A's
  shape). PEFT initialises B to zero, so W_0 is the base model and ΔP(0→s) is epoch s's update.
* **Full checkpoints** (``model.safetensors``, sharded or not) with a ``base`` checkpoint: the
  change is ``W_s - W_base`` for every tensor present in both.

Computation streams over modules and, inside a module, over blocks of rows, in float64 numpy:
only the dot products ``<a, a>``, ``<b, b>``, ``<c, c>``, ``<a, b>``, ``<a, c>``, ``<b, c>`` are
accumulated, so memory stays at a few row blocks whatever the model size. Per-module angles are
written too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umerge.analysis._io import out_dir, pyplot, save_figure, write_csv, write_json
from umerge.errors import InputError

ROW_BLOCK = 1024  # rows of a module's update materialised at once (1024 x 11008 float64 = 90 MB)


def _open(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="np")
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise InputError(f"{path}: cannot read safetensors ({exc})") from None


def _tensor(handle: Any, name: str, where: Path) -> np.ndarray:
    dtype = handle.get_slice(name).get_dtype()
    if dtype not in ("BF16", "F8_E4M3", "F8_E5M2"):
        return np.asarray(handle.get_tensor(name), dtype=np.float64)
    try:  # numpy has no bfloat16: read it through torch when it is installed
        import torch  # noqa: F401
        from safetensors import safe_open
    except ImportError as exc:
        raise InputError(f"{where}: {name} is {dtype}; reading it needs torch") from exc
    with safe_open(str(where), framework="pt") as f:
        return f.get_tensor(name).double().numpy()


class LoraCheckpoint:
    """The per-module updates ``scaling * B @ A`` of one PEFT LoRA adapter, read lazily."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        self.file = p if p.is_file() else p / "adapter_model.safetensors"
        if not self.file.is_file():
            raise InputError(f"{p}: no adapter_model.safetensors")
        cfg_path = next(
            (c for c in (self.file.parent / "adapter_config.json", self.file.parent.parent / "adapter_config.json") if c.is_file()),
            None,
        )
        if cfg_path is None:
            raise InputError(f"{self.file.parent}: no adapter_config.json (needed for lora_alpha)")
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.get("use_dora"):
            raise InputError(f"{cfg_path}: DoRA adapters are not supported by the angle analysis")
        self.alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
        self.alpha_pattern: dict[str, float] = {k: float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
        self.rslora = bool(cfg.get("use_rslora", False))
        self._h = _open(self.file)
        self.modules: dict[str, tuple[str, str]] = {}
        names = set(self._h.keys())
        for n in sorted(names):
            m = re.match(r"^(.*)\.lora_(embedding_)?A(\.weight)?$", n)
            if not m:
                continue
            b = f"{m.group(1)}.lora_{m.group(2) or ''}B{m.group(3) or ''}"
            if b not in names:
                raise InputError(f"{self.file}: {n} has no matching {b}")
            self.modules[m.group(1)] = (n, b)
        if not self.modules:
            raise InputError(f"{self.file}: no lora_A/lora_B tensors")

    def scaling(self, module: str, rank: int) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA), alpha from alpha_pattern when it matches."""
        alpha = self.alpha
        for key, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                alpha = value
                break
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def names(self) -> list[str]:
        """Module names (the prefix before ``.lora_A``)."""
        return list(self.modules)

    def blocks(self, module: str) -> Iterator[np.ndarray]:
        """The module's update ``scaling * B @ A`` in blocks of rows (float64)."""
        a_name, b_name = self.modules[module]
        a = _tensor(self._h, a_name, self.file)
        b = _tensor(self._h, b_name, self.file)
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise InputError(f"{self.file}: {module}: lora_B {b.shape} and lora_A {a.shape} do not multiply")
        s = self.scaling(module, a.shape[0])
        for i in range(0, b.shape[0], ROW_BLOCK):
            yield s * (b[i : i + ROW_BLOCK] @ a)


class FullCheckpoint:
    """The per-tensor changes ``W - W_base`` of a full safetensors checkpoint (sharded or not)."""

    def __init__(self, path: str | Path, base: str | Path) -> None:
        self.path = Path(path)
        self._w = _index(self.path)
        self._base = _index(Path(base))
        self.modules = {n: n for n in self._w if n in self._base}
        if not self.modules:
            raise InputError(f"{self.path}: no tensor in common with the base {base}")

    def names(self) -> list[str]:
        return list(self.modules)

    def blocks(self, module: str) -> Iterator[np.ndarray]:
        wf, bf = self._w[module], self._base[module]
        with _open(wf) as hw, _open(bf) as hb:
            w = _tensor(hw, module, wf)
            b = _tensor(hb, module, bf)
        if w.shape != b.shape:
            raise InputError(f"{module}: shape {w.shape} in {wf} but {b.shape} in the base {bf}")
        w = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
        b = b.reshape(w.shape)
        for i in range(0, w.shape[0], ROW_BLOCK):
            yield w[i : i + ROW_BLOCK] - b[i : i + ROW_BLOCK]


def _index(d: Path) -> dict[str, Path]:
    """tensor name -> file, for a safetensors file or a model directory."""
    if d.is_file():
        with _open(d) as h:
            return {n: d for n in h.keys()}
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        wm = json.loads(idx.read_text(encoding="utf-8")).get("weight_map", {})
        return {n: d / f for n, f in wm.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise InputError(f"{d}: no safetensors checkpoint")
    out: dict[str, Path] = {}
    for f in files:
        with _open(f) as h:
            out.update({n: f for n in h.keys()})
    return out


def open_checkpoint(path: str | Path, base: str | Path | None = None) -> LoraCheckpoint | FullCheckpoint:
    """A LoRA adapter when the directory holds one, else a full checkpoint (which needs ``base``)."""
    p = Path(path)
    if (p / "adapter_model.safetensors").is_file() or p.name == "adapter_model.safetensors":
        return LoraCheckpoint(p)
    if base is None:
        raise InputError(f"{p}: not a LoRA adapter; a full checkpoint needs --base (the starting model)")
    return FullCheckpoint(p, base)


def _angle(dot: float, n1: float, n2: float) -> float | None:
    if n1 <= 0 or n2 <= 0:
        return None
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / math.sqrt(n1 * n2)))))


def _stats(acc: Mapping[str, float]) -> dict[str, float | None]:
    return {
        "angle_0s_sF": _angle(acc["ab"], acc["aa"], acc["bb"]),
        "angle_0s_0F": _angle(acc["ac"], acc["aa"], acc["cc"]),
        "angle_sF_0F": _angle(acc["bc"], acc["bb"], acc["cc"]),
        "norm_0s": math.sqrt(acc["aa"]),
        "norm_sF": math.sqrt(acc["bb"]),
        "norm_0F": math.sqrt(acc["cc"]),
        "dim": int(acc["n"]),
    }


def null_band(norm_0s: float, norm_sF: float, dim: int, z: float = 1.96) -> dict[str, tuple[float, float]]:
    """The three angles' central 95% range when ΔP(0→s) and ΔP(s→F) are independent random
    directions in R^dim with the measured norms (ΔP(0→F) their sum).

    The cosine t of two independent uniform directions in R^D has mean 0 and variance 1/D (its law
    is a scaled Beta((D-1)/2, (D-1)/2)); for the dimensions of a model's update (D >= 10^3) it is
    normal to well under 1% in its quantiles, so t in [-z/sqrt(D), z/sqrt(D)]. With a = |ΔP(0→s)|,
    b = |ΔP(s→F)|: angle(ΔP(0→s), ΔP(s→F)) = arccos t; angle(ΔP(0→s), ΔP(0→F)) has cosine
    (a + b t) / sqrt(a^2 + b^2 + 2 a b t), and angle(ΔP(s→F), ΔP(0→F)) has (b + a t) / the same;
    both are monotone in t, so the band ends are the values at t = -+z/sqrt(D). Random
    high-dimensional increments are themselves near 90 degrees apart: an observed angle means
    something only outside this band.
    """
    if dim < 2:
        raise InputError(f"the null band needs a dimension of at least 2, got {dim}")
    t_hi = min(1.0, z / math.sqrt(dim))

    def with_sum(x: float, y: float, t: float) -> float:
        norm = math.sqrt(max(x * x + y * y + 2 * x * y * t, 0.0))
        return math.degrees(math.acos(max(-1.0, min(1.0, (x + y * t) / norm)))) if norm > 0 else 90.0

    def band(f: Any) -> tuple[float, float]:
        lo, hi = f(-t_hi), f(t_hi)
        return (min(lo, hi), max(lo, hi))

    return {
        "angle_0s_sF": band(lambda t: math.degrees(math.acos(t))),
        "angle_0s_0F": band(lambda t: with_sum(norm_0s, norm_sF, t)),
        "angle_sF_0F": band(lambda t: with_sum(norm_sF, norm_0s, t)),
    }


def plateau_epoch(log: str | Path, tol: float = 0.1, term: str = "forget_nll") -> int | None:
    """The epoch s after which the forget loss has plateaued (the paper's choice of s).

    Per-epoch means of `term` over the log's step rows, m_1..m_K; s is the first epoch k < K from
    which on every epoch moves it by at most tol of its whole change: |m_{j+1} - m_j| <=
    tol * |m_K - m_1| for all j >= k (a flat start during warmup is not a plateau); K - 1 when even
    the last epoch moves it more. None when the log has fewer than two epochs or the term is missing.
    """
    from umerge.analysis.curves import read_log

    steps, _ = read_log(log)
    by_epoch: dict[int, list[float]] = {}
    for r in steps:
        if r[term] is not None and r["epoch"] is not None:
            by_epoch.setdefault(max(1, math.ceil(r["epoch"] - 1e-9)), []).append(r[term])
    epochs = sorted(by_epoch)
    if len(epochs) < 2:
        return None
    means = [sum(by_epoch[k]) / len(by_epoch[k]) for k in epochs]
    total = abs(means[-1] - means[0])
    s = epochs[-2]
    for i in range(len(epochs) - 2, -1, -1):  # walk back while the epochs after i stay flat
        if abs(means[i + 1] - means[i]) > tol * total:
            break
        s = epochs[i]
    return s


def change_angles(
    at_s: LoraCheckpoint | FullCheckpoint, final: LoraCheckpoint | FullCheckpoint
) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """(whole-model angles and norms, per-module rows) between ΔP(0→s), ΔP(s→F), ΔP(0→F)."""
    if set(at_s.names()) != set(final.names()):
        only = sorted(set(at_s.names()) ^ set(final.names()))[:3]
        raise InputError(f"the two checkpoints change different modules (e.g. {', '.join(only)})")
    total = dict.fromkeys(("aa", "bb", "cc", "ab", "ac", "bc", "n"), 0.0)
    per_module = []
    for name in at_s.names():
        acc = dict.fromkeys(total, 0.0)
        for a, c in zip(at_s.blocks(name), final.blocks(name), strict=True):
            if a.shape != c.shape:
                raise InputError(f"{name}: update shape {a.shape} at s but {c.shape} at the end")
            b = c - a
            acc["aa"] += float(np.vdot(a, a))
            acc["bb"] += float(np.vdot(b, b))
            acc["cc"] += float(np.vdot(c, c))
            acc["ab"] += float(np.vdot(a, b))
            acc["ac"] += float(np.vdot(a, c))
            acc["bc"] += float(np.vdot(b, c))
            acc["n"] += a.size
        for k in total:
            total[k] += acc[k]
        per_module.append({"module": name, **_stats(acc)})
    return _stats(total), per_module


def epoch_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(k, OUT/epoch-k)]`` sorted by k."""
    d = Path(run_dir)
    found = []
    for p in d.glob("epoch-*"):
        m = re.fullmatch(r"epoch-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    if not found:
        raise InputError(f"{d}: no epoch-<k>/ checkpoints (train with save_every_epoch)")
    return sorted(found)


def run_angles(
    run_dir: str | Path, final: str | Path | None = None, base: str | Path | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows per epoch s, per-module rows) for one run; F is ``final`` or the last epoch."""
    epochs = epoch_dirs(run_dir)
    final_path = Path(final) if final is not None else epochs[-1][1]
    fin = open_checkpoint(final_path, base)
    rows: list[dict[str, Any]] = []
    modules: list[dict[str, Any]] = []
    for k, p in epochs:
        if p.resolve() == final_path.resolve():
            continue
        whole, per = change_angles(open_checkpoint(p, base), fin)
        rows.append({"epoch": k, **whole})
        modules += [{"epoch": k, **r} for r in per]
    if not rows:
        raise InputError(f"{run_dir}: only the final checkpoint exists: no intermediate epoch to compare")
    return rows, modules


def angle_analysis(
    runs: Mapping[str, str | Path] | Sequence[str | Path],
    out: str | Path,
    base: str | Path | None = None,
    logs: Mapping[str, str | Path] | None = None,
    s: int | None = None,
) -> dict[str, Path]:
    """Angles for one or more runs, each with its random-direction null band and its chosen s.

    s is `s` when given, else the epoch where the run's forget loss plateaus (`plateau_epoch` on
    ``logs[label]``, default ``RUN/train_log.jsonl``), else the first epoch. Writes ``angles.png``,
    ``angles.csv`` (with the null band per row), ``angles.json`` ({label: {"rows", "s", "s_rule",
    "at_s"}}) and ``angles_by_module.csv`` into ``out``.
    """
    if not isinstance(runs, Mapping):
        runs = {Path(r).name or str(r): r for r in runs}
    if not runs:
        raise InputError("the angle analysis needs at least one run directory")
    d = out_dir(out)
    table: list[dict[str, Any]] = []
    by_module: list[dict[str, Any]] = []
    series: dict[str, dict[str, Any]] = {}
    for label, run in runs.items():
        rows, modules = run_angles(run, base=base)
        for r in rows:
            for key, (lo, hi) in null_band(r["norm_0s"], r["norm_sF"], r["dim"]).items():
                r[f"null_{key}_lo"], r[f"null_{key}_hi"] = lo, hi
        log = Path(logs[label]) if logs and label in logs else Path(run) / "train_log.jsonl"
        if s is not None:
            chosen, rule = s, "given"
        else:
            found = plateau_epoch(log) if log.is_file() else None
            chosen, rule = (found, "forget loss plateau (every later epoch moves it by <= 10% of its total change)") \
                if found is not None else (rows[0]["epoch"], "first epoch (no training log to find the plateau)")
        at_s = next((r for r in rows if r["epoch"] == chosen), None)
        if at_s is None:
            raise InputError(f"{run}: no checkpoint for epoch s={chosen} (epochs: {[r['epoch'] for r in rows]})")
        series[label] = {"rows": rows, "s": chosen, "s_rule": rule, "at_s": at_s}
        table += [{"label": label, **r} for r in rows]
        by_module += [{"label": label, **r} for r in modules]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    styles = {"angle_0s_sF": ("ΔP(0→s) vs ΔP(s→F)", "-"), "angle_0s_0F": ("ΔP(0→s) vs ΔP(0→F)", "--"),
              "angle_sF_0F": ("ΔP(s→F) vs ΔP(0→F)", ":")}
    for i, (label, entry) in enumerate(series.items()):
        color, run_rows = f"C{i}", entry["rows"]
        for key, (name, ls) in styles.items():
            pts = [(r["epoch"], r[key]) for r in run_rows if r[key] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", color=color,
                        label=f"{label}: {name}" if len(series) > 1 else name)
        xs = [r["epoch"] for r in run_rows]
        ax.fill_between(xs, [r["null_angle_0s_sF_lo"] for r in run_rows], [r["null_angle_0s_sF_hi"] for r in run_rows],
                        color=color, alpha=0.15, linewidth=0,
                        label=f"{label}: random directions, 95%" if len(series) > 1 else "random directions, 95%")
        ax.axvline(entry["s"], color=color, linewidth=0.8, linestyle="-.")
    ax.set_xlabel("epoch s (dash-dot: the s chosen at the forget-loss plateau)")
    ax.set_ylabel("angle (degrees)")
    ax.set_ylim(0, 180)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axhline(90, color="grey", linewidth=0.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Angles between parameter-change vectors")
    null_cols = [f"null_{k}_{e}" for k in styles for e in ("lo", "hi")]
    cols = ["label", "epoch", "angle_0s_sF", "angle_0s_0F", "angle_sF_0F", "norm_0s", "norm_sF", "norm_0F", "dim"]
    return {
        "figure": save_figure(fig, d / "angles.png"),
        "csv": write_csv(d / "angles.csv", table, cols + null_cols),
        "json": write_json(d / "angles.json", series),
        "modules_csv": write_csv(d / "angles_by_module.csv", by_module, ["label", "epoch", "module", *cols[2:]]),
    }
