"""mergekit itself, for the parity tests: YAML configs run through its `run_merge` (what
`mergekit-yaml` calls) in the peer venv, all in one process so torch is imported once."""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Mapping
from pathlib import Path

#: Runs each (config, output) pair; options: `lora_merge_cache` (where mergekit writes the merged
#: copies of `model+lora` references) and `record_refusals` (a config mergekit refuses is recorded
#: and printed as JSON, instead of failing the run).
_RUNNER = textwrap.dedent("""
    import json, sys, yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    jobs, options = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, cuda=False,
                        **({"lora_merge_cache": options["lora_merge_cache"]} if options.get("lora_merge_cache") else {}))
    refused = {}
    for cfg, out in jobs:
        try:
            with open(cfg) as f:
                run_merge(MergeConfiguration.model_validate(yaml.safe_load(f)), out, opts)
        except Exception as e:
            if not options.get("record_refusals"):
                raise
            refused[cfg] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(refused))
""")


def run_mergekit(peers: Path, root: Path, configs: Mapping[str, str], *, lora_merge_cache: Path | None = None,
                 record_refusals: bool = False, timeout: float = 900) -> tuple[dict[str, Path], set[str]]:
    """Writes each config as `root/NAME.yml` and merges it into `root/mk_NAME` with mergekit.

    Returns the outputs by name and the names of the configs mergekit refused (always empty unless
    `record_refusals`: otherwise a refusal fails the run)."""
    jobs = []
    for name, text in configs.items():
        cfg = root / f"{name}.yml"
        cfg.write_text(textwrap.dedent(text))
        jobs.append((str(cfg), str(root / f"mk_{name}")))
    options = {"lora_merge_cache": str(lora_merge_cache) if lora_merge_cache else None,
               "record_refusals": record_refusals}
    proc = subprocess.run([str(peers / "bin" / "python"), "-c", _RUNNER, json.dumps(jobs), json.dumps(options)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"mergekit failed:\n{proc.stderr[-3000:]}"
    refused = {Path(c).stem for c in json.loads(proc.stdout.strip().splitlines()[-1])}
    return {Path(c).stem: Path(o) for c, o in jobs}, refused
