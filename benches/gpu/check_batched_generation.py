"""Does batched greedy generation give the texts that one-prompt-at-a-time generation gives?

    python benches/gpu/check_batched_generation.py MODEL_DIR DATA_DIR [--rows N] [--batch-size B]
        [--max-new-tokens T] [--out FILE.json]

The model is loaded as `umerge eval` loads it (`umerge.evaluate.run.load_model`: CUDA and bfloat16
when CUDA is there, else the CPU and float32); the prompts are the ``input`` of the forget and retain
rows of DATA_DIR (`umerge.evaluate.data.load_eval_data`), the first N of each task and kind in each
split as ``umerge eval --max-rows N`` takes them. Both runs use `umerge.evaluate.generate.generate`;
the comparison is `umerge.evaluate.generate.batched_matches_single`.

Prints one line; writes the result, the model's device and dtype, and torch's versions to --out.
Exit status: 0 when every prompt gave the same text, 1 when any differed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model directory (config.json, safetensors, tokenizer)")
    p.add_argument("data_dir", metavar="DATA_DIR", help="a directory with forget.jsonl and retain.jsonl")
    p.add_argument("--rows", type=int, default=16,
                   help="rows of each task and kind in each split (default 16: up to 192 prompts for LUME)")
    p.add_argument("--batch-size", type=int, default=8, help="the batched run's batch size (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    return p.parse_args(argv)


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and the prompts, compare, and return the JSON-ready result."""
    import torch
    import transformers

    from umerge.evaluate import data as data_io
    from umerge.evaluate.generate import batched_matches_single
    from umerge.evaluate.run import load_model

    transformers.utils.logging.disable_progress_bar()  # per-file load bars: noise beside the one line
    rows = data_io.load_eval_data(args.data_dir)
    prompts = [r["input"] for s in ("forget", "retain") for r in data_io.head_per_task(rows[s], args.rows)]
    start = time.perf_counter()
    model, tokenizer, meta, _ = load_model(args.model_dir)
    load_seconds = time.perf_counter() - start
    result = batched_matches_single(
        model, tokenizer, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
    )
    return {
        "model": str(args.model_dir),
        "data": str(args.data_dir),
        "rows_per_task_and_kind": args.rows,
        "device": meta["device"],
        "dtype": meta["dtype"],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if meta["device"].startswith("cuda") else None,
        "load_seconds": load_seconds,
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    from umerge.errors import InputError

    args = parse_args(argv)
    try:
        if args.rows < 1:
            raise InputError(f"--rows must be >= 1, got {args.rows}")
        result = run_check(args)
    except InputError as exc:
        print(f"check_batched_generation: error: {exc}", file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    verdict = "PASS" if result["all_equal"] else "FAIL"
    print(f"{verdict} batched generation: {result['n_equal']}/{result['n']} prompts equal "
          f"(batch size {result['batch_size']} vs 1, {result['max_new_tokens']} new tokens, "
          f"{result['device']} {result['dtype']}, {result['seconds_batched']:.1f}s vs {result['seconds_single']:.1f}s) "
          f"model {result['model']}")
    return 0 if result["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
