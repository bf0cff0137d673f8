"""A mergekit user's habits on `umerge run`: mergekit-yaml's command line runs unchanged.

- OUT as the second argument (`umerge run cfg.yml out/`), the same bytes as `-o out/`;
- torch's and mergekit's dtype names for `--out-dtype`, the same bytes as the short names;
- every mergekit-yaml flag: accepted with its one-line note, mapped to the umerge option, or refused
  with a one-line error (and, with the peer venv, no flag of mergekit-yaml left out of the table);
- a Hugging Face Hub id where a model path goes: one line saying how to download it, exit 2,
  nothing written; any other missing path: a plain one-line "no such ... directory".

In process through `umerge.cli.main` (SystemExit on errors, stderr through capsys).
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import Family, run_umerge
from umerge.cli import main
from umerge.cli.mergekit_flags import FLAGS, MAPS, NOTE, REFUSED

HUB_ID = "mistralai/Mistral-7B-v0.1"


def _umerge(args: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Runs `umerge ARGS` in process; returns (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _config(tmp_path: Path, text: str, name: str = "merge.yml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture
def linear_cfg(odd_f32_family: Family, tmp_path: Path) -> Path:
    a, c = odd_f32_family.finetuned
    return _config(tmp_path, f"""\
        merge_method: linear
        models:
          - model: {a}
            parameters: {{weight: 0.3}}
          - model: {c}
            parameters: {{weight: 0.7}}
        """)


@pytest.fixture
def dare_cfg(odd_f32_family: Family, tmp_path: Path) -> Path:
    b, (a, c) = odd_f32_family.base, odd_f32_family.finetuned
    return _config(tmp_path, f"""\
        merge_method: dare_ties
        base_model: {b}
        models:
          - model: {a}
          - model: {c}
        parameters: {{density: 0.5, weight: 1.0}}
        """, "dare.yml")


def _weights(out: Path) -> dict[str, bytes]:
    """The checkpoint's files (shards, index, side files); not the recipe, which names OUT."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "umerge.yml"}


def _spec(args: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    code, out, err = _umerge(["run", *args, "--print-spec"], capsys)
    assert code == 0, err
    return json.loads(out), err


def _one_error(code: int, err: str) -> str:
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("umerge: error: "), err
    return lines[0]


def _dirs(tmp_path: Path) -> set[str]:
    return {p.name for p in tmp_path.iterdir() if p.is_dir()}


# ---- OUT as the second argument -------------------------------------------------------------

def test_positional_output_gives_the_same_bytes_as_o(linear_cfg: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _umerge(["run", linear_cfg, tmp_path / "pos", "--quiet"], capsys)
    assert code == 0, err
    code, _, err = _umerge(["run", linear_cfg, "-o", tmp_path / "opt", "--quiet"], capsys)
    assert code == 0, err
    pos, opt = _weights(tmp_path / "pos"), _weights(tmp_path / "opt")
    assert any(n.endswith(".safetensors") for n in pos) and pos == opt
    assert not (tmp_path / "merged").exists()  # -o's default was not used


def test_positional_output_and_the_same_o_agree(linear_cfg: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _umerge(["run", linear_cfg, tmp_path / "out", "-o", f"{tmp_path / 'out'}/", "--quiet"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "umerge.yml").is_file()


def test_positional_output_and_a_different_o_is_an_error_naming_both(linear_cfg: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    before = _dirs(tmp_path)
    code, _, err = _umerge(["run", linear_cfg, tmp_path / "one", "-o", tmp_path / "two"], capsys)
    line = _one_error(code, err)
    assert str(tmp_path / "one") in line and str(tmp_path / "two") in line, line
    assert _dirs(tmp_path) == before


# ---- --out-dtype spellings --------------------------------------------------------------------

@pytest.mark.parametrize(("long", "short"), [("bfloat16", "bf16"), ("float16", "f16"), ("float32", "f32")])
def test_torch_dtype_names_give_the_same_bytes_as_the_short_ones(linear_cfg: Path, tmp_path: Path, long: str,
                                                                 short: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # (already accepted before this file: kept as a guard for `umerge run` in particular)
    for name in (long, short):
        code, _, err = _umerge(["run", linear_cfg, tmp_path / name, "--out-dtype", name, "--quiet"], capsys)
        assert code == 0, err
    assert _weights(tmp_path / long) == _weights(tmp_path / short)


# ---- mergekit-yaml's flags --------------------------------------------------------------------

#: What each noted flag's line must say, written here by hand (not read from the table).
NOTE_SAYS = {
    "--cuda": "CPU", "--no-cuda": "CPU", "--device": "CPU", "--gpu-rich": "CPU", "--read-to-gpu": "CPU",
    "--multi-gpu": "CPU", "--low-cpu-memory": "--memory-budget", "--lazy-unpickle": "memory-maps safetensors",
    "--allow-crimes": "by name", "--trust-remote-code": "no model code", "--transformers-cache": "downloads nothing",
    "--lora-merge-cache": "LoRA", "--lora-merge-dtype": "LoRA", "--clone-tensors": "nothing to clone",
    "--copy-tokenizer": "tokenizer", "--write-model-card": "umerge.yml", "--no-write-model-card": "umerge.yml",
    "--safe-serialization": "safetensors", "--async-write": "--threads", "--write-threads": "--threads",
    "-v": "--quiet", "--no-quiet": "default", "--no-unsafe-truncate-embeddings": "never truncated",
}
VALUES = {"--device": "cuda:0", "--transformers-cache": "/tmp/hf", "--lora-merge-cache": "/tmp/lora",
          "--lora-merge-dtype": "bfloat16", "--write-threads": "2"}


def _note_flags() -> list[str]:
    return [d for f in FLAGS if f.handling == NOTE for d in f.decls]


def test_every_noted_flag_is_checked_here() -> None:
    for flag in _note_flags():  # a --no- form is checked against its positive form's words
        assert flag in NOTE_SAYS or "--" + flag[len("--no-"):] in NOTE_SAYS, flag


@pytest.mark.parametrize("flag", _note_flags())
def test_harmless_flag_is_accepted_with_one_note(flag: str, linear_cfg: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    plain, _ = _spec([linear_cfg, tmp_path / "o"], capsys)
    extra = [flag] + ([VALUES[flag]] if flag in VALUES else [])
    spec, err = _spec([linear_cfg, tmp_path / "o", *extra], capsys)
    assert spec == plain  # changes nothing
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("umerge: note: "), err
    positive = flag if flag in NOTE_SAYS else "--" + flag[len("--no-"):]
    assert flag in lines[0] and NOTE_SAYS[positive] in lines[0], lines[0]


def test_a_mergekit_command_line_runs_unchanged(linear_cfg: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _umerge(["run", linear_cfg, tmp_path / "mk", "--cuda", "--lazy-unpickle", "--allow-crimes",
                            "--copy-tokenizer", "--no-write-model-card", "-j", "2", "--random-seed", "1",
                            "--out-shard-size", "5B", "-v", "--quiet"], capsys)
    assert code == 0, err
    notes = err.strip().splitlines()
    assert len(notes) == 8 and all(n.startswith("umerge: note: ") for n in notes), err  # -j needs none
    code, _, err = _umerge(["run", linear_cfg, "-o", tmp_path / "um", "--threads", "2", "--quiet"], capsys)
    assert code == 0, err
    assert _weights(tmp_path / "mk") == _weights(tmp_path / "um")


@pytest.mark.parametrize("spelling", ["-j", "--num-threads"])
def test_num_threads_is_threads(spelling: str, linear_cfg: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    spec, err = _spec([linear_cfg, tmp_path / "o", spelling, "3"], capsys)
    assert spec["threads"] == 3 and err == ""
    spec, _ = _spec([linear_cfg, tmp_path / "o", spelling, "3", "--threads", "3"], capsys)
    assert spec["threads"] == 3
    code, _, err = _umerge(["run", linear_cfg, tmp_path / "o", spelling, "3", "--threads", "2"], capsys)
    line = _one_error(code, err)
    assert "3" in line and "--threads 2" in line and "-j/--num-threads" in line, line


def test_random_seed_is_seed_for_random_methods(dare_cfg: Path, linear_cfg: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    spec, err = _spec([dare_cfg, tmp_path / "o", "--random-seed", "5"], capsys)
    assert spec["params"]["seed"] == 5
    assert err.startswith("umerge: note: --random-seed is --seed") and err.count("\n") == 1, err
    with_seed, _ = _spec([dare_cfg, tmp_path / "o", "--seed", "5"], capsys)
    assert spec == with_seed
    # mergekit's seed is unused by methods that draw nothing; umerge's --seed there is an error
    spec, _ = _spec([linear_cfg, tmp_path / "o", "--random-seed", "5"], capsys)
    assert "seed" not in spec["params"]
    code, _, err = _umerge(["run", dare_cfg, tmp_path / "o", "--random-seed", "5", "--seed", "6"], capsys)
    line = _one_error(code, err)
    assert "--seed 6" in line and "--random-seed 5" in line, line


def test_out_shard_size_counts_parameters(linear_cfg: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    spec, err = _spec([linear_cfg, tmp_path / "o", "--out-shard-size", "10K"], capsys)
    assert spec["max_shard_size"] == 10_000 * 4  # float32 inputs, output dtype the base's
    assert "counts parameters" in err
    spec, _ = _spec([linear_cfg, tmp_path / "o", "--out-shard-size", "10K", "--out-dtype", "bfloat16"], capsys)
    assert spec["max_shard_size"] == 10_000 * 2
    code, _, err = _umerge(["run", linear_cfg, tmp_path / "out", "--out-shard-size", "10K", "--quiet"], capsys)
    assert code == 0, err
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1 and all(s.stat().st_size <= 40_000 for s in shards)


@pytest.mark.parametrize(("args", "needle"), [
    (["--out-shard-size", "10K", "--max-shard-size", "1MB"], "--max-shard-size"),
    (["--out-shard-size", "lots"], "lots"),
    (["--out-shard-size", "0"], "at least 1"),
])
def test_out_shard_size_errors(args: list[str], needle: str, linear_cfg: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _umerge(["run", linear_cfg, tmp_path / "out", *args], capsys)
    assert needle in _one_error(code, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flag", "needle"), [
    ("--no-copy-tokenizer", "always copies the tokenizer files"),
    ("--no-safe-serialization", "safetensors only"),
    ("--unsafe-truncate-embeddings", "does not cut embedding rows"),
])
def test_refused_flag_is_one_line_that_explains(flag: str, needle: str, linear_cfg: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    before = _dirs(tmp_path)
    code, _, err = _umerge(["run", linear_cfg, tmp_path / "out", flag], capsys)
    line = _one_error(code, err)
    assert flag in line and needle in line, line
    assert _dirs(tmp_path) == before
    assert {f.decls[0] for f in FLAGS if f.handling == REFUSED} == {
        "--no-copy-tokenizer", "--no-safe-serialization", "--unsafe-truncate-embeddings"}


def test_run_help_shows_positional_out_and_the_flag_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _umerge(["run", "--help"], capsys)
    assert code == 0
    assert "CONFIG [OUT]" in out.splitlines()[0]
    table = "".join(out[out.index("mergekit-yaml flags"):].split())  # without the line wrapping
    for f in FLAGS:
        assert f.decls[0] in table, f.decls
    assert "-j, --num-threads" not in out.split("mergekit-yaml flags")[0]  # hidden from the option list
    assert {f.handling for f in FLAGS} == {NOTE, MAPS, REFUSED}


def test_the_table_covers_every_mergekit_yaml_flag(peers: Path) -> None:
    """Every option of the installed mergekit-yaml is in the table or is umerge run's own."""
    code = ("import json; from mergekit.scripts.run_yaml import main; "
            "print(json.dumps([o for p in main.params for o in (*p.opts, *p.secondary_opts) if o.startswith('-')]))")
    proc = subprocess.run([str(peers / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from umerge.cli.methods import run_cmd

    ours = {o for p in run_cmd.params for o in (*p.opts, *p.secondary_opts)}
    missing = sorted(set(json.loads(proc.stdout)) - ours)
    assert not missing, missing



def test_umerge_methods_lists_every_method_mergekit_registers(peers: Path) -> None:
    """`umerge methods` names each merge method of the installed mergekit (passthrough included)."""
    code = ("import json; from mergekit.merge_methods.registry import registered_methods; "
            "print(json.dumps([m.spec.name for m in registered_methods()]))")
    proc = subprocess.run([str(peers / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = run_umerge(["methods", "--json"])
    assert result.returncode == 0, result.stderr
    ours = {m["name"] for m in json.loads(result.stdout)}
    missing = sorted(set(json.loads(proc.stdout)) - ours)
    assert not missing, missing
    assert "passthrough" in run_umerge(["methods"]).stdout

# ---- Hub ids and missing paths ------------------------------------------------------------------

@pytest.mark.parametrize("where", ["model", "base_model", "tokenizer_source"])
def test_hub_id_in_a_config_says_how_to_download(where: str, odd_f32_family: Family, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    a, c = odd_f32_family.finetuned
    cfg = {"model": f"merge_method: linear\nmodels:\n  - model: {HUB_ID}\n  - model: {c}\n",
           "base_model": f"merge_method: ties\nbase_model: {HUB_ID}\nmodels:\n  - model: {a}\n"
                         "parameters: {density: 0.5, weight: 1.0}\n",
           "tokenizer_source": f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {c}\n"
                               f"tokenizer_source: {HUB_ID}\n"}[where]
    path = _config(tmp_path, cfg)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _umerge(["run", path, tmp_path / "out"], capsys)
    line = _one_error(code, err)
    assert line.startswith(f"umerge: error: {where} {HUB_ID} is not a local directory"), line
    assert "local directories only" in line and f"hf download {HUB_ID} --local-dir DIR" in line, line
    assert "point the config at DIR" in line and "does not exist" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_hub_id_with_a_revision(odd_f32_family: Family, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    c = odd_f32_family.finetuned[1]
    path = _config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {HUB_ID}@main\n  - model: {c}\n")
    code, _, err = _umerge(["run", path, tmp_path / "out"], capsys)
    assert f"hf download {HUB_ID} --revision main --local-dir DIR" in _one_error(code, err)


@pytest.mark.parametrize("command", [["linear"], ["ties", "--density", "0.5", "--base", "{b}"]])
def test_hub_id_on_the_command_line(command: list[str], odd_f32_family: Family, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    b, (a, _) = odd_f32_family.base, odd_f32_family.finetuned
    args = [x.format(b=b) for x in command] + [HUB_ID, str(a), "-o", str(tmp_path / "out")]
    code, _, err = _umerge(args, capsys)
    line = _one_error(code, err)
    assert f"hf download {HUB_ID} --local-dir DIR" in line and "pass DIR instead" in line, line
    assert "does not exist" not in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["nothere", "no/such/dir", "./owner/name"])
def test_other_missing_paths_are_a_plain_message_printed_once(missing: str, odd_f32_family: Family,
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    c = odd_f32_family.finetuned[1]
    path = _config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {missing}\n  - model: {c}\n")
    code, _, err = _umerge(["run", path, tmp_path / "out"], capsys)
    line = _one_error(code, err)
    assert line == f"umerge: error: no such model directory ({missing})", line
    code, _, err = _umerge(["linear", missing, str(c), "-o", tmp_path / "out"], capsys)
    assert _one_error(code, err) == f"umerge: error: no such model directory ({missing})"
    assert not (tmp_path / "out").exists()
