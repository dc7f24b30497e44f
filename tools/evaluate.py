"""Evaluate a checkpoint with lm-evaluation-harness, in this process, on the inference engine.

    python tools/evaluate.py --load runs/x/ckpt --tasks stdlib_builtins_mc,stdlib_zen_complete
    torchrun --nproc-per-node 4 tools/evaluate.py --load runs/x/ckpt --tensor-model-parallel-size 2 \\
        --tasks hellaswag --include-path /data/lm_eval_tasks --output-path results.json

--load takes what the server takes (ours at any layout, universal, argonne, Hugging Face folders). With more ranks
than tp × pp, the rest is data parallelism: lm-eval gives each dp replica its share of the requests (model type
"megatron", megatron/inference/lm_eval_adapter.py). --include-path adds a folder of lm-eval task YAML (default:
examples/eval_tasks, small tasks built from Python's own text); lm-eval's bundled tasks need their datasets
(the Hugging Face Hub or a local copy, which HF_DATASETS_CACHE / data_files point to). A task YAML's relative
`data_files` are taken relative to the YAML's folder. Rank 0 prints lm-eval's table and writes --output-path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.deepspeed_compat import quiet_cpu_accelerator_probe  # noqa: E402

quiet_cpu_accelerator_probe()

from megatron.errors import ConfigError  # noqa: E402

LOCAL_TASKS = os.path.join(ROOT, "examples", "eval_tasks")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--load", required=True)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    p.add_argument("--include-path", default=LOCAL_TASKS, help="a folder of task YAML files (default: %(default)s)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction when < 1)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per engine call")
    p.add_argument("--max-gen-toks", type=int, default=256, help="generate_until's default budget")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's random seed (few-shot sampling, ...)")
    p.add_argument("--output-path", default=None, help="write lm-eval's results (JSON) here")
    p.add_argument("--log-samples", action="store_true", help="include every document's requests and answers")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=None, help="the context (default: the checkpoint's)")
    for flag in ("--tokenizer-type", "--tokenizer-model", "--vocab-file", "--merge-file"):
        p.add_argument(flag, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true")
    prec.add_argument("--fp16", action="store_true")
    return p


def task_specs(names: list[str], include_path: str) -> list:
    """lm-eval task specs: a task defined by a YAML under include_path whose `data_files` are relative becomes its
    config with those paths made absolute (relative to the YAML's folder, not the working directory); other
    names stay names for lm-eval's TaskManager."""
    import yaml

    configs = {}
    for folder, _, files in os.walk(include_path):
        for name in sorted(f for f in files if f.endswith((".yaml", ".yml"))):
            path = os.path.join(folder, name)
            try:
                with open(path, encoding="utf-8") as f:
                    config = yaml.safe_load(f)
            except yaml.YAMLError:  # lm-eval's own tags (!function): left to the TaskManager
                continue
            data_files = ((config or {}).get("dataset_kwargs") or {}).get("data_files") if isinstance(
                config, dict) else None
            if not isinstance(config, dict) or not isinstance(config.get("task"), str) or not data_files:
                continue
            def absolute(value):
                if isinstance(value, str):
                    return value if os.path.isabs(value) or "://" in value else os.path.join(folder, value)
                if isinstance(value, list):
                    return [absolute(v) for v in value]
                return {k: absolute(v) for k, v in value.items()}
            config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": absolute(data_files)}
            configs[config["task"]] = config
    return [configs.get(name, name) for name in names]


def evaluate(lm, tasks: list[str], include_path: str, num_fewshot=None, limit=None, seed: int = 0,
             log_samples: bool = False):
    """lm_eval.simple_evaluate on `lm` (any lm-eval model) with the local task folder; results on rank 0."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not os.path.isdir(include_path):
        raise ConfigError(f"--include-path {include_path}: no such folder of task YAML files")
    specs = task_specs(tasks, include_path)
    # indexing lm-eval's own thousands of task files takes half a minute: only when a task may be one of them
    manager = TaskManager(include_path=include_path, include_defaults=any(isinstance(s, str) for s in specs))
    if limit is not None and limit >= 1:
        limit = int(limit)
    return lm_eval.simple_evaluate(model=lm, tasks=specs, num_fewshot=num_fewshot,
                                   limit=limit, task_manager=manager, log_samples=log_samples,
                                   random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                   fewshot_random_seed=seed, bootstrap_iters=0)


def main(argv=None) -> int:
    """0 once evaluated, 2 on a refusal (said once for the job, no traceback)."""
    from megatron.distributed.refusal import run_entry_point

    args = build_parser().parse_args(argv)
    return run_entry_point("evaluate.py", lambda: evaluate_checkpoint(args))


def evaluate_checkpoint(args) -> int:
    import torch

    from megatron.distributed import initialize_distributed
    from megatron.distributed.launcher import discover
    from megatron.fileio import write_text_atomically
    from megatron.inference import InferenceEngine
    from megatron.inference.lm_eval_adapter import MegatronLM

    if discover().world_size > 1:
        initialize_distributed(use_deepspeed=False)
    tokenizer_args = {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
                      "vocab_file": args.vocab_file, "merge_file": args.merge_file, "vocab_size": args.vocab_size}
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    engine = InferenceEngine.from_checkpoint(args.load, tp=args.tensor_model_parallel_size,
                                             pp=args.pipeline_model_parallel_size, tokenizer_args=tokenizer_args,
                                             dtype=dtype, max_batch_size=args.batch_size,
                                             max_sequence_length=args.seq_length)
    ps = engine.ps
    lm = MegatronLM(engine, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks,
                    dp_group=ps.groups.get("dp"), dp_rank=ps.dp_rank, dp_size=ps.dp_size)
    tasks = [t for t in args.tasks.split(",") if t]
    results = evaluate(lm, tasks, args.include_path, args.num_fewshot, args.limit, args.seed, args.log_samples)
    if ps.rank == 0 and results is not None:
        from lm_eval.utils import make_table

        print(make_table(results), flush=True)
        if args.output_path:
            write_text_atomically(args.output_path, json.dumps(results, indent=2, default=str) + "\n")
            print(f"wrote {args.output_path}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    from megatron.distributed import destroy_distributed

    destroy_distributed()
    sys.exit(code)
