"""Upstream's ALCF entry point (argonne-lcf/Megatron-DeepSpeed's ALCF/helpers.sh launches this file): the same
run as pretrain_gpt.py, flag for flag, so recipes that name it work unchanged; and, as upstream's, wandb on rank 0
by default (project $WB_PROJECT, else $WANDB_PROJECT, else "AuroraGPT"; WANDB_MODE=disabled turns it off) and a
--data-path that is a directory blends every .bin file in it with weight 1 (pretrain_gpt.data_path_directory)."""

from __future__ import annotations


from pretrain_gpt import exit_with, main

if __name__ == "__main__":
    exit_with(main(alcf=True))
