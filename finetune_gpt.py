"""Post-train a GPT / Llama-style model: supervised fine-tuning or DPO on data from tools/preprocess_data.py --task.

    torchrun --nproc-per-node 4 finetune_gpt.py --task sft --data-path P_text_document --load HF_OR_CKPT \\
        --finetune --tokenizer-type HFTokenizer --tokenizer-model HF_DIR ... (pretrain_gpt.py's flags)
    mpiexec -n 24 python finetune_gpt.py --task dpo --dpo-beta 0.1 --dpo-loss sigmoid --data-path ... --load SFT

It launches like pretrain_gpt.py and runs the same loop (megatron/training/loop.py) with a post-training task
(megatron/post_training/tasks.py): every layout, optimizer, schedule, precision, checkpoint and reliability flag
of pretraining applies. docs/POST_TRAINING.md is the guide.
"""

from __future__ import annotations

import sys

PROG = "finetune_gpt.py"


def check_post_training_run(run) -> None:
    """What finetune_gpt.py refuses in a parsed run (ConfigError naming the flags)."""
    from megatron.errors import ConfigError

    problems = []
    if run.parallel.sp > 1:
        problems.append(f"--ds-sequence-parallel-size {run.parallel.sp} (Ulysses) is not supported by finetune_gpt.py: "
                        "the response masks and pair log-probabilities would need summing over the sequence shards; "
                        "use tensor or pipeline parallelism")
    if run.data.mock_data:
        problems.append("--mock-data has no prompts or responses: give --data-path to the prefix written by "
                        "tools/preprocess_data.py --task sft|dpo")
    if run.training.rampup_batch_size:
        problems.append("--rampup-batch-size is not supported by finetune_gpt.py (a DPO pair count or SFT token count "
                        "is normalised over a fixed global batch); drop it")
    if problems:
        raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(problems))


def main(argv: list[str] | None = None) -> int:
    """pretrain_gpt.main's exit codes (0, 2 bad input, 3 a rank stopped answering, 4 NaN steps)."""
    import pretrain_gpt
    from megatron.config.post_training import add_post_training_arguments, split_post_training_args
    from megatron.distributed.refusal import say_refusal
    from megatron.errors import MegatronError

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv or "--help-all" in argv:
        import argparse

        from megatron.config.data import add_post_training_data_arguments

        parser = argparse.ArgumentParser(prog=PROG, add_help=False)
        add_post_training_arguments(parser)
        add_post_training_data_arguments(parser)
        print(parser.format_help().split("\n\n", 1)[1], flush=True)  # the groups without the usage line
        print(f"{PROG} takes every pretrain_gpt.py flag too:\n", flush=True)
        if "--task" not in argv:
            argv += ["--task", "sft"]
    try:
        config, rest = split_post_training_args(argv)
    except MegatronError as error:
        launch = pretrain_gpt.launch_info()
        if launch is None:
            say_refusal(error, 0, 1, True, prog=PROG)
        else:
            say_refusal(error, launch.rank, launch.world_size, True, launch.master_addr,
                                     launch.master_port, prog=PROG)
        return error.exit_code
    from megatron.post_training.tasks import build_task

    return pretrain_gpt.main(rest, prog=PROG, task=build_task(config), check_run=check_post_training_run)


if __name__ == "__main__":
    from pretrain_gpt import exit_with

    exit_with(main())
