"""The CLI's one convention: command spellings, unknown commands, -o/--out, --out-dtype names.

Through click's CliRunner (in process) and `umerge.cli.main` (for the one-line error format).
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import Family
from umerge.cli import _COMMANDS, cli, main
from umerge.safetensors_io import checkpoint_dtypes

#: Commands that read only; every other command writes and so takes -o/--out.
READERS = {"methods", "inspect", "verify", "presets"}
TWO_WORD = ["task-arithmetic", "magnitude-prune", "dare-linear", "dare-ties", "breadcrumbs-ties", "della-linear",
            "model-stock", "merge-adapters", "extract-lora"]


def _invoke(args: list[str]) -> click.testing.Result:
    return CliRunner().invoke(cli, args, prog_name="umerge", catch_exceptions=False)


def _command(path: list[str]) -> click.Command:
    ctx = click.Context(cli)
    cmd: click.Command = cli
    for name in path:
        assert isinstance(cmd, click.Group)
        found = cmd.get_command(ctx, name)
        assert found is not None, path
        cmd = found
    return cmd


def _analyze_commands() -> list[str]:
    group = _command(["analyze"])
    assert isinstance(group, click.Group)
    return group.list_commands(click.Context(group))


@pytest.mark.parametrize("name", TWO_WORD + ["analyze loss-curves", "analyze density-sweep"])
def test_every_command_answers_to_both_spellings(name: str) -> None:
    *group, command = name.split()
    shown = " ".join(["umerge", *group, command])
    for spelling in (command, command.replace("-", "_")):
        result = _invoke([*group, spelling, "--help"])
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"Usage: {shown} "), result.output.splitlines()[0]


def test_help_shows_one_spelling() -> None:
    ctx = click.Context(cli)
    assert not [name for name in cli.list_commands(ctx) if "_" in name]
    top = _invoke(["--help"]).output
    for name in TWO_WORD:
        assert f"  {name} " in top and name.replace("-", "_") not in top, name
    analyze = _invoke(["analyze", "--help"]).output
    assert "  loss-curves " in analyze and "loss_curves" not in analyze


@pytest.mark.parametrize(("args", "suggestion"), [
    (["tie"], "ties"),
    (["task-arithmatic"], "task-arithmetic"),
    (["merge_adapter"], "merge-adapters"),
    (["analyze", "loss-curve"], "loss-curves"),
])
def test_unknown_command_suggests_the_closest(args: list[str], suggestion: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    assert err.startswith(f"umerge: error: no such command {args[-1]!r} (did you mean {suggestion!r}?)"), err


def test_unknown_command_without_a_close_match(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "umerge: error: no such command 'frobnicate'; see umerge --help\n"


@pytest.mark.parametrize("path", [[n] for n in _COMMANDS if n not in READERS and n != "analyze"]
                         + [["analyze", n] for n in _analyze_commands()])
def test_every_command_that_writes_takes_o_out(path: list[str]) -> None:
    cmd = _command(path)
    out = next((p for p in cmd.params if p.name == "out"), None)
    assert out is not None and {"-o", "--out"} <= set(out.opts), path
    help_text = _invoke([*path, "--help"]).output
    assert "-o, --out " in help_text and "--output" not in help_text, path


@pytest.mark.parametrize("path", [["eval"], ["analyze", "methods"]])
def test_old_output_spelling_still_parses(path: list[str], tmp_path: Path) -> None:
    for spelling in ("-o", "--out", "--output"):
        result = CliRunner().invoke(cli, prog_name="umerge", args=[*path, spelling, str(tmp_path / "x"), "--help"])
        assert result.exit_code == 0, (spelling, result.output)
    out = next(p for p in _command(path).params if p.name == "out")
    assert "--output" in out.opts


@pytest.mark.parametrize(("spelling", "dtype"), [
    ("bf16", "BF16"), ("bfloat16", "BF16"), ("BFloat16", "BF16"),
    ("f16", "F16"), ("float16", "F16"),
    ("f32", "F32"), ("float32", "F32"),
])
def test_out_dtype_takes_short_and_long_names(spelling: str, dtype: str, odd_bf16_family: Family,
                                              tmp_path: Path) -> None:
    fam = odd_bf16_family
    result = _invoke(["linear", *map(str, fam.finetuned[:2]), "--out-dtype", spelling, "-o", str(tmp_path / "m"),
                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert set(checkpoint_dtypes(tmp_path / "m").values()) == {dtype}


def test_out_dtype_names_reach_every_writer() -> None:
    """The same choice everywhere --out-dtype appears (merge methods, run, fold, merge-adapters)."""
    for name in _COMMANDS:
        cmd = _command([name])
        opt = next((p for p in cmd.params if p.name == "out_dtype"), None)
        if opt is None:
            continue
        assert isinstance(opt.type, click.Choice)
        assert {"bf16", "f16", "f32", "bfloat16", "float16", "float32"} <= set(opt.type.choices), name
        assert opt.process_value(click.Context(cmd), "float16") == "f16", name


def test_out_dtype_refuses_an_unknown_name(odd_bf16_family: Family, tmp_path: Path) -> None:
    fam = odd_bf16_family
    result = CliRunner().invoke(cli, ["linear", *map(str, fam.finetuned[:2]), "--out-dtype", "float64",
                                      "-o", str(tmp_path / "m")], prog_name="umerge")
    assert result.exit_code == 2 and "float64" in result.output
    assert not (tmp_path / "m").exists()


def test_python_api_takes_the_long_names_too(odd_bf16_family: Family, tmp_path: Path) -> None:
    import umerge

    fam = odd_bf16_family
    umerge.linear([str(p) for p in fam.finetuned[:2]], out=str(tmp_path / "m"), out_dtype="float32", progress=False)
    assert set(checkpoint_dtypes(tmp_path / "m").values()) == {"F32"}
