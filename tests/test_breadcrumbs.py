"""breadcrumbs and breadcrumbs_ties against the independent float64 numpy reference.

The reference (`reference_merge.breadcrumbs`) ranks by a full stable sort; the engine finds the
two cuts by radix select. Checked on float32 Llama-shaped checkpoints (odd sizes, 1-D norms,
3 shards), every element except where a magnitude tie straddles a cut (none occur with these
random values, and the test says so if one does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import umerge
from conftest import Family
from reference_merge import breadcrumbs, keep_count, threshold_ties
from umerge.safetensors_io import load_checkpoint


@pytest.mark.parametrize(("method", "density", "gamma"), [
    ("breadcrumbs", 0.6, 0.05),
    ("breadcrumbs", 0.95, 0.2),  # the outlier drop shrinks to n - kept
    ("breadcrumbs_ties", 0.5, 0.1),
])
def test_matches_numpy_reference(odd_f32_family: Family, tmp_path: Path, method: str, density: float,
                                 gamma: float) -> None:
    fam = odd_f32_family
    weights = [1.0, 0.7]
    getattr(umerge, method)(fam.finetuned, fam.base, density=density, gamma=gamma, weights=weights,
                            out=tmp_path / "o", progress=False)
    ours = load_checkpoint(tmp_path / "o")
    base = load_checkpoint(fam.base)
    models = [load_checkpoint(m) for m in fam.finetuned]
    changed = 0
    for name, b in base.items():
        deltas = [m[name].astype(np.float64) - b.astype(np.float64) for m in models]
        n = b.size
        kept = keep_count(density, n)
        dropped = min(int(gamma * n), n - kept)
        for d in deltas:  # a tie straddling either cut would make the reference's choice arbitrary
            assert not threshold_ties(d, kept + dropped).any() and not threshold_ties(d, dropped).any(), name
        expected = breadcrumbs(b, deltas, density, gamma, weights, consensus=method.endswith("ties"))
        np.testing.assert_allclose(ours[name].astype(np.float64), expected, rtol=2e-6, atol=1e-6, err_msg=name)
        changed += int(not np.array_equal(ours[name], b))
    assert changed > 0
    assert "gamma" in (tmp_path / "o" / "umerge.yml").read_text()


def test_gamma_zero_is_magnitude_prune(odd_f32_family: Family, tmp_path: Path) -> None:
    fam = odd_f32_family
    umerge.breadcrumbs(fam.finetuned, fam.base, density=0.4, gamma=0.0, out=tmp_path / "b", progress=False)
    umerge.magnitude_prune(fam.finetuned, fam.base, density=0.4, out=tmp_path / "m", progress=False)
    b, m = load_checkpoint(tmp_path / "b"), load_checkpoint(tmp_path / "m")
    for name in m:
        np.testing.assert_array_equal(b[name], m[name], err_msg=name)


def test_cli_commands_match_the_api(odd_f32_family: Family, tmp_path: Path) -> None:
    from conftest import run_umerge

    fam = odd_f32_family
    a, c = fam.finetuned
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        r = run_umerge([method, a, c, "--base", fam.base, "--density", "0.6", "--gamma", "0.05",
                        "--weight", "1", "--weight", "0.5", "-o", tmp_path / f"cli_{method}", "--quiet"])
        assert r.returncode == 0, r.stderr
        getattr(umerge, method)([a, c], fam.base, density=0.6, gamma=0.05, weights=[1.0, 0.5],
                                out=tmp_path / f"api_{method}", progress=False)
        cli, api = load_checkpoint(tmp_path / f"cli_{method}"), load_checkpoint(tmp_path / f"api_{method}")
        for name in api:
            np.testing.assert_array_equal(cli[name], api[name], err_msg=f"{method} {name}")
