"""`umerge search`: the in-memory candidate against the written path, the validation/test split, the
candidate spaces, the best recipe through `umerge run`, and the command end to end on a tiny world.

References: the in-memory merge is checked against the path the demo writes (`merge_adapters` to an
adapter directory, `umerge.fold` into the base, the folded directory loaded by transformers); the
split against its rule re-implemented here from the module's description; the grid against a list
written out by hand; the Pareto front and the choice against hand-made points.
"""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from adapters_support import build_base, make_adapter  # noqa: E402
from conftest import run_umerge  # noqa: E402
from umerge.adapters.lora import load_adapter  # noqa: E402
from umerge.adapters.merge import merged_tensors  # noqa: E402
from umerge.errors import InputError  # noqa: E402
from umerge.search.inmemory import MergedModel  # noqa: E402
from umerge.search.results import choose, pareto_front  # noqa: E402
from umerge.search.space import Candidate, SearchSpace, default_candidate, grid, random_candidates  # noqa: E402
from umerge.search.split import document_id, split_data  # noqa: E402

pytestmark = pytest.mark.train


# ---------------------------------------------------------------------------------------------
# fixtures: a tiny Llama family (equivalence) and a tiny world with an OLMo and two adapters (CLI)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    build_base("llama").save_pretrained(str(root / "base"))
    build_base("llama").to(torch.bfloat16).save_pretrained(str(root / "base-bf16"))
    a = make_adapter(root / "base", root / "a", r=4, alpha=8, seed=1)
    b = make_adapter(root / "base", root / "b", r=4, alpha=8, seed=2)
    return {"base": root / "base", "base_bf16": root / "base-bf16", "a": a, "b": b}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from umerge.demo.world import WorldConfig, generate_world, write_world
    from umerge.unlearn.tiny import build_tiny_olmo, save_model, train_byte_bpe_tokenizer

    root = tmp_path_factory.mktemp("world")
    w = generate_world(WorldConfig(seed=3, docs_per_task=2, nonmember_docs_per_task=2))
    data = write_world(w, root / "data")
    texts = [r["input"] + " " + r["output"] for s in ("forget", "retain") for r in w.rows(s)]
    texts += ["Answer: A Answer: B Answer: C Answer: D"] * 50  # " A".." D" become one token each, for MMLU
    tok = train_byte_bpe_tokenizer(texts, vocab_size=320)
    model = build_tiny_olmo(tok, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                            max_position_embeddings=512, seed=0)
    base = save_model(model, tok, root / "base")
    a = make_adapter(base, root / "a", r=4, alpha=8, seed=1)
    b = make_adapter(base, root / "b", r=4, alpha=8, seed=2)
    return {"root": root, "data": data, "base": base, "a": a, "b": b}


def _logits(model: "torch.nn.Module", ids: "torch.Tensor") -> "torch.Tensor":
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------------------------------------
# the in-memory candidate equals the written path


@pytest.mark.parametrize("method, density", [("ties", 0.8), ("dare_ties", 0.6), ("magnitude_prune", 0.5),
                                             ("linear", None)])
def test_in_memory_merge_equals_merge_then_fold(llama: dict[str, Path], tmp_path: Path, method: str,
                                                density: float | None) -> None:
    from umerge.demo.merging import merge_adapters

    weights = (1.0, 0.7)
    folded = merge_adapters(llama["base"], [llama["a"], llama["b"]], tmp_path / "folded", method=method,
                            density=density or 0.8, weights=weights, seed=5)
    disk = transformers.AutoModelForCausalLM.from_pretrained(str(folded), dtype=torch.float32).eval()
    loaded = [load_adapter(llama["a"]), load_adapter(llama["b"])]
    mm = MergedModel(llama["base"], loaded, device="cpu")
    tensors, rank = merged_tensors(loaded, method, weights, density=density, seed=5)
    mm.apply(tensors, rank)
    # weights: the same up to the order of the float32 sums in B @ A (torch here, the engine's blocks there)
    disk_sd = disk.state_dict()
    for name, p in mm.model.state_dict().items():
        ref = disk_sd[name]
        assert torch.allclose(p, ref, rtol=0, atol=1e-6 * max(1.0, float(ref.abs().max()))), name
    ids = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(0))
    got, want = _logits(mm.model, ids), _logits(disk, ids)
    assert float((got - want).abs().max()) < 1e-5
    # restore gives the base back bit for bit
    mm.restore()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(llama["base"]), dtype=torch.float32).eval()
    for name, p in mm.model.state_dict().items():
        assert torch.equal(p, base.state_dict()[name]), name
    assert torch.equal(_logits(mm.model, ids), _logits(base, ids))


def test_in_memory_merge_rounds_to_a_bf16_base_as_the_fold_does(llama: dict[str, Path], tmp_path: Path) -> None:
    """A bf16 base: the fold rounds W + ΔW to bf16 once; so does the in-memory path. Only an element
    whose float32 sum sits within an ulp-sized sliver of a bf16 rounding boundary may round the other
    way (the two sums differ by float32 ulps): at most one bf16 ulp, on a tiny fraction of elements."""
    from umerge.demo.merging import merge_adapters

    folded = merge_adapters(llama["base_bf16"], [llama["a"], llama["b"]], tmp_path / "folded", method="ties",
                            density=0.8, weights=(1.0, 1.0))
    disk = transformers.AutoModelForCausalLM.from_pretrained(str(folded), dtype=torch.float32).state_dict()
    loaded = [load_adapter(llama["a"]), load_adapter(llama["b"])]
    mm = MergedModel(llama["base_bf16"], loaded, device="cpu")
    mm.apply(*merged_tensors(loaded, "ties", (1.0, 1.0), density=0.8))
    n_diff = n_all = 0
    for name, p in mm.model.state_dict().items():
        ref = disk[name]
        assert torch.equal(p.to(torch.bfloat16).float(), p), f"{name} is not bf16-representable"
        diff = p != ref
        n_diff += int(diff.sum())
        n_all += p.numel()
        if diff.any():  # one bf16 ulp at most: 2^-7 of the value's binade
            ulp = torch.finfo(torch.bfloat16).eps * torch.maximum(p.abs(), ref.abs())[diff]
            assert bool(((p - ref).abs()[diff] <= ulp).all()), name
    assert n_diff <= 1e-3 * n_all


def test_adapters_of_another_base_are_refused(llama: dict[str, Path], world: dict[str, Path]) -> None:
    loaded = [load_adapter(llama["a"]), load_adapter(llama["b"])]
    with pytest.raises(InputError, match="another base model"):
        MergedModel(world["base"], loaded, device="cpu")


# ---------------------------------------------------------------------------------------------
# the split


def _halve(ids: list[str], seed: int, *keys: str) -> set[str]:
    """The documented rule, written out: sorted ids, PCG64(seed, crc32 of each key) permutation, first n // 2."""
    ordered = sorted(set(ids))
    rng = np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])
    perm = rng.permutation(len(ordered))
    return {ordered[i] for i in perm[: len(ordered) // 2]}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_split_is_disjoint_by_document_deterministic_and_follows_its_rule(world: dict[str, Path], tmp_path: Path) -> None:
    d = world["data"]
    kw = dict(members=d / "mia" / "member.jsonl", nonmembers=d / "mia" / "nonmember.jsonl", mmlu_dir=d / "mmlu")
    parts, manifest = split_data(d, tmp_path / "s1", seed=4, **kw)
    again, _ = split_data(d, tmp_path / "s2", seed=4, **kw)
    other, _ = split_data(d, tmp_path / "s3", seed=5, **kw)
    for split in ("forget", "retain"):
        all_rows = _rows(d / f"{split}.jsonl")
        val = _rows(parts["validation"].dir / f"{split}.jsonl")
        test = _rows(parts["test"].dir / f"{split}.jsonl")
        # every row once, in one part; a document's rows all in the same part
        assert sorted(r["id"] for r in val + test) == sorted(r["id"] for r in all_rows)
        vdocs, tdocs = {document_id(r["id"]) for r in val}, {document_id(r["id"]) for r in test}
        assert not vdocs & tdocs
        # the rule: per task, the documented permutation's first n // 2 documents go to validation
        for task in {r["task"] for r in all_rows}:
            docs = [document_id(r["id"]) for r in all_rows if r["task"] == task]
            assert {x for x in vdocs if x in docs} == _halve(docs, 4, split, task)
            assert any(document_id(r["id"]) in docs for r in test)  # both parts keep every task
        # deterministic: the same seed writes the same files; another seed another split
        for p in ("validation", "test"):
            assert (again[p].dir / f"{split}.jsonl").read_bytes() == (parts[p].dir / f"{split}.jsonl").read_bytes()
    assert any((other[p].dir / "forget.jsonl").read_bytes() != (parts[p].dir / "forget.jsonl").read_bytes()
               for p in ("validation", "test"))
    # MIA members follow their forget documents; nonmembers are split without overlap
    val_forget = {document_id(r["id"]) for r in _rows(parts["validation"].dir / "forget.jsonl")}
    for r in _rows(parts["validation"].members):
        assert document_id(r["id"]) in val_forget
    for r in _rows(parts["test"].members):
        assert document_id(r["id"]) not in val_forget
    vn = {r["id"] for r in _rows(parts["validation"].nonmembers)}
    tn = {r["id"] for r in _rows(parts["test"].nonmembers)}
    assert vn and tn and not vn & tn and vn | tn == {r["id"] for r in _rows(d / "mia" / "nonmember.jsonl")}
    # MMLU: the test questions halved without overlap, the dev shots in both
    for subject_file in (d / "mmlu" / "test").iterdir():
        whole = list(csv.reader(subject_file.open()))
        got = [list(csv.reader((parts[p].mmlu / "test" / subject_file.name).open())) for p in ("validation", "test")
               if (parts[p].mmlu / "test" / subject_file.name).is_file()]
        assert sorted(map(tuple, sum(got, []))) == sorted(map(tuple, whole))
    assert manifest["parts"]["validation"]["rows"]["forget"] + manifest["parts"]["test"]["rows"]["forget"] == \
        len(_rows(d / "forget.jsonl"))


def test_split_refuses_a_task_with_one_document(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    rows = [{"id": f"doc{i}sc1", "input": "a", "output": "b", "task": "Task1"} for i in range(3)]
    (d / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "retain.jsonl").write_text(json.dumps({"id": "onlyqa0", "input": "a", "output": "b", "task": "Task2"}) + "\n")
    with pytest.raises(InputError, match="retain: task Task2 has 1 document"):
        split_data(d, tmp_path / "s")


# ---------------------------------------------------------------------------------------------
# the candidates


def test_grid_enumerates_exactly_the_requested_candidates() -> None:
    space = SearchSpace(2, methods=("ties", "linear"), densities=(0.5, 1.0), majority_signs=("total", "frequency"),
                        weights=((1.0, 1.0), (0.5, 1.0)))
    want = [Candidate("ties", w, d, s) for s in ("total", "frequency") for d in (0.5, 1.0)
            for w in ((1.0, 1.0), (0.5, 1.0))] + [Candidate("linear", w) for w in ((1.0, 1.0), (0.5, 1.0))]
    assert grid(space) == want
    assert len(grid(SearchSpace(3, methods=("magnitude_prune",), densities=(0.3,), weight_values=(0.5, 1.0)))) == 8
    assert default_candidate(2) == Candidate("ties", (1.0, 1.0), 0.8, "total")


def test_random_search_is_reproducible_and_stays_in_its_ranges() -> None:
    space = SearchSpace(2, methods=("ties", "dare_linear", "linear"), densities=(0.2, 0.9),
                        majority_signs=("total", "frequency"), weight_values=(0.25, 1.5))
    a, b, c = random_candidates(space, 12, 7), random_candidates(space, 12, 7), random_candidates(space, 12, 8)
    assert a == b and a != c and len(a) == 12 and len(set(a)) == 12
    for cand in a:
        assert cand.method in space.methods
        assert all(0.25 <= w <= 1.5 for w in cand.weights)
        assert cand.density is None if cand.method == "linear" else 0.2 <= cand.density <= 0.9
    assert {cand.method for cand in random_candidates(space, 40, 1)} == set(space.methods)


def test_bad_spaces_are_refused() -> None:
    with pytest.raises(InputError, match="unknown merge method 'slerp'"):
        SearchSpace(2, methods=("slerp",))
    with pytest.raises(InputError, match="at least two adapters"):
        SearchSpace(1)
    with pytest.raises(InputError, match="3 weights for 2 adapters"):
        SearchSpace(2, weights=((1.0, 1.0, 1.0),))


def test_choice_and_pareto_front_on_hand_made_points() -> None:
    rows = [{"aggregate": 0.5, "task_aggregate": 0.1, "mia_score": 0.9},
            {"aggregate": 0.7, "task_aggregate": 0.5, "mia_score": 0.5},
            {"aggregate": 0.7, "task_aggregate": 0.4, "mia_score": 0.4},   # dominated by row 1
            {"aggregate": None, "task_aggregate": 0.9, "mia_score": None},  # no MIA: off the front
            {"aggregate": 0.6, "task_aggregate": 0.6, "mia_score": 0.2}]
    assert choose(rows, "final") == 1  # 0.7 twice: the earlier wins
    assert choose(rows, "task") == 3
    assert pareto_front(rows, ("task_aggregate", "mia_score")) == [0, 1, 4]
    with pytest.raises(InputError, match="no candidate has a mmlu score"):
        choose(rows, "mmlu")


# ---------------------------------------------------------------------------------------------
# the recipe and `umerge run`


def test_written_recipe_round_trips_and_runs_like_the_demo_merge(llama: dict[str, Path], tmp_path: Path) -> None:
    import umerge
    from umerge.adapters import merge_adapters as umerge_merge_adapters
    from umerge.adapters.recipe import read_recipe, recipe_for, write_recipe
    from umerge.demo.merging import merge_adapters
    from umerge.safetensors_io import load_checkpoint

    r = recipe_for("dare_ties", [str(llama["a"]), str(llama["b"])], [0.5, 1.25], base=str(llama["base"]),
                   density=0.7, majority_sign="frequency", seed=11, comment=["a comment"])
    path = write_recipe(r, tmp_path / "best.yml")
    back = read_recipe(path)
    assert (back.method, back.adapters, back.weights, back.base, back.density, back.majority_sign, back.seed,
            back.normalize) == ("dare_ties", r.adapters, [0.5, 1.25], r.base, 0.7, "frequency", 11, False)
    res = run_umerge(["run", path, "-o", tmp_path / "run", "-q"])
    assert res.returncode == 0, res.stderr
    # the same merge through the Python API: the adapter merge with these arguments, folded
    umerge_merge_adapters([str(llama["a"]), str(llama["b"])], str(tmp_path / "ad"), method="dare_ties",
                          weights=[0.5, 1.25], density=0.7, majority_sign="frequency", seed=11)
    umerge.fold(str(tmp_path / "ad"), base=str(llama["base"]), out=str(tmp_path / "ref"), progress=False)
    got, want = load_checkpoint(tmp_path / "run"), load_checkpoint(tmp_path / "ref")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    # the recipe's sign election and seed reached the merge: the demo's dare_ties (sign by total) differs
    total = load_checkpoint(merge_adapters(llama["base"], [llama["a"], llama["b"]], tmp_path / "total",
                                           method="dare_ties", density=0.7, weights=(0.5, 1.25), seed=11))
    assert any(not np.array_equal(got[k], total[k]) for k in got)


def test_umerge_run_on_an_adapter_config_equals_umerge_ties_with_a_base(llama: dict[str, Path], tmp_path: Path) -> None:
    from umerge.safetensors_io import load_checkpoint

    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {llama['base']}\nmodels:\n"
                   f"  - model: {llama['a']}\n    parameters: {{weight: 1.0}}\n"
                   f"  - model: {llama['b']}\n    parameters: {{weight: 0.5}}\nparameters: {{density: 0.6}}\n")
    assert run_umerge(["run", cfg, "-o", tmp_path / "run", "-q"]).returncode == 0
    res = run_umerge(["ties", llama["a"], llama["b"], "--weight", "1", "--weight", "0.5", "--density", "0.6",
                      "--base", llama["base"], "-o", tmp_path / "ties", "-q"])
    assert res.returncode == 0, res.stderr
    got, want = load_checkpoint(tmp_path / "run"), load_checkpoint(tmp_path / "ties")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    shown = run_umerge(["run", cfg, "--print-spec"])
    assert shown.returncode == 0, shown.stderr
    req = json.loads(shown.stdout)["adapter_merge"]
    assert req["params"] == {"density": 0.6, "majority_sign": "total"} and req["model_params"] == [
        {"weight": 1.0}, {"weight": 0.5}] and req["base"] == str(llama["base"])


@pytest.mark.parametrize("extra, needle", [
    ("parameters: {density: 0.6, lambda: 0.5}\n", "parameter 'lambda' is not supported in an adapter recipe"),
    ("parameters: {density: [0.1, 0.9]}\n", "density must be one number"),
    ("parameters: {density: 0.6, normalize: true}\n", "normalize is not supported for ties"),
    ("parameters: {density: 0.6, seed: 3}\n", "seed applies to dare_linear, dare_ties, not ties"),
])
def test_bad_adapter_recipes_fail_in_one_line(llama: dict[str, Path], tmp_path: Path, extra: str, needle: str) -> None:
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {llama['base']}\nmodels:\n"
                   f"  - model: {llama['a']}\n  - model: {llama['b']}\n" + extra)
    res = run_umerge(["run", cfg, "-o", tmp_path / "run", "-q"])
    assert res.returncode == 2 and needle in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "run").exists()


def test_space_file_is_read_and_checked(tmp_path: Path) -> None:
    from umerge.cli.search import _space

    good = tmp_path / "space.yml"
    good.write_text("methods: [ties, linear]\ndensities: [0.3, 0.9]\nweights: [[1, 1], [0.5, 1]]\n")
    assert _space(good) == {"methods": ["ties", "linear"], "densities": [0.3, 0.9], "weights": [[1, 1], [0.5, 1]]}
    bad = tmp_path / "bad.yml"
    bad.write_text("method: [ties]\n")
    with pytest.raises(InputError, match="unknown key 'method'"):
        _space(bad)


# ---------------------------------------------------------------------------------------------
# the command end to end


_FAST = ["--max-new-tokens", "6", "--batch-size", "16", "--mmlu-k-shot", "1", "--torch-threads", "1"]


@pytest.fixture(scope="module")
def searched(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, "object"]:
    out = tmp_path_factory.mktemp("search") / "out"
    res = run_umerge(["search", world["a"], world["b"], "--base", world["base"], "--data", world["data"],
                      "--methods", "ties,dare_ties", "--densities", "0.5,0.8", "--weights", "1,1", *_FAST,
                      "-o", out, "-q"], timeout=300)
    return out, res


def test_cli_end_to_end_writes_every_output(searched: tuple[Path, "object"]) -> None:
    out, res = searched
    assert res.returncode == 0, res.stderr
    assert "test split (quote these)" in res.stdout
    for name in ("search.csv", "search.md", "pareto.png", "best.yml", "search.json", "split/split.json",
                 "test/chosen/report.json", "test/default/report.json", "split/validation/forget.jsonl",
                 "split/test/mia/member.jsonl", "split/test/mmlu"):
        assert (out / name).exists(), name
    rows = list(csv.DictReader((out / "search.csv").open()))
    assert [(r["method"], float(r["density"])) for r in rows] == [("ties", 0.5), ("ties", 0.8), ("dare_ties", 0.5),
                                                                   ("dare_ties", 0.8)]
    assert [r["default"] for r in rows] == ["False", "True", "False", "False"]
    res_json = json.loads((out / "search.json").read_text())
    assert len(res_json["candidates"]) == 4 and res_json["default"] == 1
    assert set(res_json["comparison"]) == {"chosen", "default", "same_candidate"}
    assert res_json["comparison"]["default"]["label"] == "ties d=0.8 w=1,1"
    for part in ("chosen", "default"):
        rep = json.loads((out / "test" / part / "report.json").read_text())
        assert rep["meta"]["rows"]["forget"] == res_json["split"]["parts"]["test"]["rows"]["forget"]
    # the MIA and MMLU files were found in the demo layout, said and recorded
    assert any("mia" in n for n in res_json["notes"]) and res_json["data"]["mmlu_dir"].endswith("mmlu")
    assert not list(out.parent.glob(".umerge-search-*"))  # the temporary directory was renamed away


def test_best_recipe_runs_and_gives_the_candidates_weights(searched: tuple[Path, "object"], world: dict[str, Path],
                                                           tmp_path: Path) -> None:
    out, res = searched
    assert res.returncode == 0, res.stderr
    r = run_umerge(["run", out / "best.yml", "-o", tmp_path / "merged", "-q"])
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "search.json").read_text())
    c = Candidate.from_dict(info["candidates"][info["chosen"]])
    loaded = [load_adapter(world["a"]), load_adapter(world["b"])]
    mm = MergedModel(world["base"], loaded, device="cpu")
    mm.apply(*merged_tensors(loaded, c.method, c.weights, density=c.density, majority_sign=c.majority_sign,
                             seed=info["seed"]))
    disk = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).state_dict()
    for name, p in mm.model.state_dict().items():
        assert torch.allclose(p, disk[name], rtol=0, atol=1e-6 * max(1.0, float(disk[name].abs().max()))), name


def test_the_same_search_twice_gives_the_same_table(searched: tuple[Path, "object"], world: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """The Python API with the command's arguments: the same candidates, split and scores."""
    from umerge.search import SearchOptions, search

    out, res = searched
    assert res.returncode == 0, res.stderr
    d = world["data"]
    again = search(SearchOptions(
        adapters=[world["a"], world["b"]], base=world["base"], data=d, out=tmp_path / "again",
        space=SearchSpace(2, methods=("ties", "dare_ties"), densities=(0.5, 0.8), weights=((1.0, 1.0),)),
        mia_members=d / "mia" / "member.jsonl", mia_nonmembers=d / "mia" / "nonmember.jsonl", mmlu_dir=d / "mmlu",
        max_new_tokens=6, batch_size=16, mmlu_k_shot=1, torch_threads=1, progress=False))
    first = json.loads((out / "search.json").read_text())

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]

    assert strip(again["candidates"]) == strip(first["candidates"])
    assert again["split"] == first["split"] and again["comparison"] == first["comparison"]


@pytest.mark.parametrize("args, needle", [
    (["A"], "at least two adapters (got 1)"),
    (["A", "OTHER"], "adapters of different base models"),
    (["A", "B", "--methods", "ties,slerp"], "unknown merge method 'slerp'"),
    (["A", "B", "--grid", "--random", "3"], "give --grid or --random N, not both"),
    (["A", "B", "--objective", "mia", "--data", "PLAIN"], "--objective mia needs the MIA"),
])
def test_bad_input_is_one_line_and_exit_2(world: dict[str, Path], llama: dict[str, Path], tmp_path: Path,
                                          args: list[str], needle: str) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for split in ("forget", "retain"):
        (plain / f"{split}.jsonl").write_bytes((world["data"] / f"{split}.jsonl").read_bytes())
    names = {"A": world["a"], "B": world["b"], "OTHER": llama["a"], "PLAIN": plain}
    argv = [str(names.get(a, a)) for a in args]
    data = [] if "--data" in argv else ["--data", str(world["data"])]
    res = run_umerge(["search", *argv, "--base", world["base"], *data, *_FAST, "-o", tmp_path / "out", "-q"])
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("umerge: error:") and needle in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".umerge-search-*"))


def test_an_output_not_written_by_search_is_not_replaced(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_umerge(["search", world["a"], world["b"], "--base", world["base"], "--data", world["data"], *_FAST,
                      "--methods", "ties", "--densities", "0.8", "--weights", "1,1", "-o", out, "--overwrite", "-q"])
    assert res.returncode == 2 and "not written by umerge search" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"

