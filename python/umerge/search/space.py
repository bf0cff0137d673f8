"""The candidates of a merge search: recipes, the space they are drawn from, grid and random draws.

A `Candidate` is one factor-wise merge of the search's adapters, in PEFT's terms: a combination
type (`METHODS`: the ones ``add_weighted_adapter`` applies factor by factor), a density for the
pruning ones, one weight per adapter, and for the TIES methods the sign election
(``majority_sign``: ``total`` or ``frequency``, PEFT's ``majority_sign_method``). That is every
variant the factor-wise path has: the mergekit and paper TIES presets exist only on full updates
(`umerge.adapters.routing` refuses them factor-wise), so they are not in this space.

A `SearchSpace` holds the values of each axis. `grid` enumerates their product in a fixed order
(method, then majority sign, density, weights), giving each method only the axes it uses, so linear
appears once per weight vector, not once per density. `random_candidates` draws N candidates with
numpy's PCG64 seeded by ``seed``: the method and majority sign uniformly from the listed ones, the
density uniformly in [min, max] of the listed densities, each weight uniformly in [min, max] of
the listed weight values, both rounded to 3 decimals so a recipe reads cleanly; the same seed gives
the same candidates. Duplicates are dropped (first kept) in both.

`DEFAULT` is the paper's merge, and the demo's: TIES at density 0.8, weights 1 for every adapter,
sign by total mass.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from umerge.errors import InputError

#: PEFT combination types the factor-wise path supports (the demo's `umerge.demo.merging.ADAPTER_METHODS`).
METHODS = ("ties", "dare_ties", "dare_linear", "magnitude_prune", "linear")
#: Methods that keep a fraction of the entries.
DENSITY_METHODS = ("ties", "dare_ties", "dare_linear", "magnitude_prune")
#: Methods with a sign election, and its two forms.
SIGN_METHODS = ("ties", "dare_ties")
MAJORITY_SIGNS = ("total", "frequency")
DEFAULT_DENSITIES = (0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class Candidate:
    """One merge recipe. ``density`` is None for linear; ``majority_sign`` only matters for the TIES methods."""

    method: str
    weights: tuple[float, ...]
    density: float | None = None
    majority_sign: str = "total"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown merge method {self.method!r} (the factor-wise methods: {', '.join(METHODS)})")
        if self.method in DENSITY_METHODS:
            if self.density is None or not 0.0 < float(self.density) <= 1.0:
                raise InputError(f"{self.method} needs a density in (0, 1], got {self.density}")
        elif self.density is not None:
            object.__setattr__(self, "density", None)  # linear keeps everything: no density axis
        if self.majority_sign not in MAJORITY_SIGNS:
            raise InputError(f"majority sign {self.majority_sign!r} is not one of {', '.join(MAJORITY_SIGNS)}")
        if self.method not in SIGN_METHODS and self.majority_sign != "total":
            object.__setattr__(self, "majority_sign", "total")  # no sign election: one form only

    @property
    def label(self) -> str:
        """A short name: ``ties d=0.8 w=1,1``, ``ties/frequency d=0.6 w=0.5,1``, ``linear w=1,1``."""
        name = self.method + ("/frequency" if self.majority_sign == "frequency" else "")
        d = f" d={self.density:g}" if self.density is not None else ""
        return f"{name}{d} w={','.join(f'{w:g}' for w in self.weights)}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = list(self.weights)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Candidate":
        return cls(method=d["method"], weights=tuple(float(w) for w in d["weights"]),
                   density=None if d.get("density") is None else float(d["density"]),
                   majority_sign=d.get("majority_sign", "total"))


def default_candidate(n_adapters: int) -> Candidate:
    """TIES, density 0.8, weight 1 each, sign by total: the paper's (and the demo's) merge."""
    return Candidate("ties", (1.0,) * n_adapters, 0.8, "total")


@dataclass
class SearchSpace:
    """The values of each axis. ``weights``: explicit weight vectors (one weight per adapter each);
    when empty, every adapter's weight is drawn from ``weight_values`` (the grid takes their product)."""

    n_adapters: int
    methods: tuple[str, ...] = METHODS
    densities: tuple[float, ...] = DEFAULT_DENSITIES
    majority_signs: tuple[str, ...] = ("total",)
    weights: tuple[tuple[float, ...], ...] = field(default_factory=tuple)
    weight_values: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.n_adapters < 2:
            raise InputError(f"a merge search needs at least two adapters (got {self.n_adapters})")
        if not self.methods:
            raise InputError("no merge methods to search")
        for m in self.methods:
            if m not in METHODS:
                raise InputError(f"unknown merge method {m!r} (the factor-wise methods: {', '.join(METHODS)})")
        for d in self.densities:
            if not 0.0 < d <= 1.0:
                raise InputError(f"density {d} is outside (0, 1]: it is the fraction of entries kept")
        if any(m in DENSITY_METHODS for m in self.methods) and not self.densities:
            raise InputError("no densities given for the pruning methods")
        for s in self.majority_signs:
            if s not in MAJORITY_SIGNS:
                raise InputError(f"majority sign {s!r} is not one of {', '.join(MAJORITY_SIGNS)}")
        for w in self.weights:
            if len(w) != self.n_adapters:
                raise InputError(f"weight vector {','.join(f'{x:g}' for x in w)} has {len(w)} weights for "
                                 f"{self.n_adapters} adapters (give one per adapter, in order)")
        if not self.weights and not self.weight_values:
            raise InputError("no weights given")

    def weight_vectors(self) -> list[tuple[float, ...]]:
        """The weight vectors the grid takes: the explicit ones, else the product of weight_values."""
        if self.weights:
            return list(self.weights)
        return [tuple(w) for w in itertools.product(self.weight_values, repeat=self.n_adapters)]

    def to_dict(self) -> dict[str, Any]:
        return {"n_adapters": self.n_adapters, "methods": list(self.methods), "densities": list(self.densities),
                "majority_signs": list(self.majority_signs), "weights": [list(w) for w in self.weights],
                "weight_values": list(self.weight_values)}


def _unique(cands: Iterable[Candidate]) -> list[Candidate]:
    return list(dict.fromkeys(cands))


def grid(space: SearchSpace) -> list[Candidate]:
    """Every combination of the axes each method uses, in order: method, majority sign, density, weights."""
    out: list[Candidate] = []
    for method in space.methods:
        signs = space.majority_signs if method in SIGN_METHODS else ("total",)
        densities: Sequence[float | None] = space.densities if method in DENSITY_METHODS else (None,)
        for sign, density, w in itertools.product(signs, densities, space.weight_vectors()):
            out.append(Candidate(method, tuple(w), density, sign))
    return _unique(out)


def random_candidates(space: SearchSpace, n: int, seed: int) -> list[Candidate]:
    """``n`` candidates drawn with PCG64(seed) (see the module docstring); fewer only when the
    space has fewer than ``n`` distinct candidates (after 100 * n draws)."""
    import numpy as np

    if n < 1:
        raise InputError(f"--random needs at least one candidate, got {n}")
    rng = np.random.default_rng(seed)
    d_lo, d_hi = (min(space.densities), max(space.densities)) if space.densities else (1.0, 1.0)
    vals = [x for w in space.weights for x in w] if space.weights else list(space.weight_values)
    w_lo, w_hi = min(vals), max(vals)
    out: dict[Candidate, None] = {}
    draws = 0
    while len(out) < n and draws < 100 * n:
        draws += 1
        method = space.methods[int(rng.integers(len(space.methods)))]
        sign = space.majority_signs[int(rng.integers(len(space.majority_signs)))]
        density = round(float(rng.uniform(d_lo, d_hi)), 3)
        weights = tuple(round(float(rng.uniform(w_lo, w_hi)), 3) for _ in range(space.n_adapters))
        c = Candidate(method, weights, max(density, 0.001) if method in DENSITY_METHODS else None, sign)
        out.setdefault(c, None)
    return list(out)


def parse_names(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """``"ties,dare_ties"`` -> names, each one of ``allowed`` (hyphens read as underscores)."""
    names = tuple(n.strip().replace("-", "_") for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise InputError(f"unknown {what} {bad[0] if bad else text!r} (choose from {', '.join(allowed)})")
    return names


__all__ = ["Candidate", "DEFAULT_DENSITIES", "DENSITY_METHODS", "MAJORITY_SIGNS", "METHODS", "SIGN_METHODS",
           "SearchSpace", "default_candidate", "grid", "parse_names", "random_candidates"]
