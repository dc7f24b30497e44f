"""What finetune_gpt.py optimises: --task sft|dpo and DPO's knobs, named as TRL's DPOConfig names them (upstream
Megatron-DeepSpeed has no DPO flags); `add_post_training_arguments`, `split_post_training_args` and
`PostTrainingConfig`. The data flags (--packing, --overlong-examples) are config/data.py's
(add_post_training_data_arguments); split_post_training_args takes them out of the command line too."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from megatron.errors import ConfigError

TASKS = ("sft", "dpo")
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust")  # megatron/post_training/losses.py


@dataclass(frozen=True)
class PostTrainingConfig:
    task: str = "sft"
    dpo_beta: float = 0.1  # TRL's beta
    dpo_loss: str = "sigmoid"  # TRL's loss_type
    label_smoothing: float = 0.0  # cDPO with sigmoid, Robust DPO with robust (TRL's label_smoothing)
    rpo_alpha: Optional[float] = None  # weight of the NLL term on the chosen responses (RPO); None: off
    ref_logps_path: Optional[str] = None  # None: beside the data (<data prefix>.dpo_reference.pt)
    recompute_ref_logps: bool = False  # replace a stored reference made from other data or another checkpoint
    packing: bool = False  # config/data.py's --packing (SFT: examples; DPO: whole pairs into row pairs)
    overlong_examples: str = "truncate"  # config/data.py's --overlong-examples


def add_post_training_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("post-training (finetune_gpt.py)")
    g.add_argument("--task", choices=TASKS, required=True,
                   help="sft: the masked next-token loss on the response tokens, normalised over the whole global "
                        "batch; dpo: direct preference optimisation against reference log-probabilities computed "
                        "once at the start and stored beside the data")
    g.add_argument("--dpo-beta", type=float, default=PostTrainingConfig.dpo_beta,
                   help="DPO's beta, the strength of the tie to the reference model (TRL's beta; default 0.1)")
    g.add_argument("--dpo-loss", choices=DPO_LOSSES, default=PostTrainingConfig.dpo_loss,
                   help="the DPO loss (TRL's loss_type): sigmoid (DPO; with --label-smoothing, conservative DPO), "
                        "hinge (SLiC), ipo, robust (Robust DPO); default sigmoid")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="probability that a preference label is flipped: cDPO with --dpo-loss sigmoid, Robust DPO "
                        "with robust; in [0, 0.5) (TRL's label_smoothing; default 0)")
    g.add_argument("--rpo-alpha", type=float, default=None,
                   help="add this weight times the NLL of the chosen responses (mean over their tokens in the "
                        "global batch) to the DPO loss: RPO (TRL's rpo_alpha, today loss_type [sigmoid, sft] with "
                        "loss_weights [1, alpha]); default off")
    g.add_argument("--ref-logps-path", default=None,
                   help="where DPO's reference log-probabilities are stored (default: beside the data, "
                        "<data prefix>.dpo_reference.pt)")
    g.add_argument("--recompute-ref-logps", action="store_true",
                   help="compute the reference log-probabilities again and replace a stored file made from other "
                        "data or another reference checkpoint (otherwise refused)")


def split_post_training_args(argv: list[str]) -> tuple[PostTrainingConfig, list[str]]:
    """(the post-training flags of argv, the remaining flags for the pretraining parser). ConfigError names a
    wrong value and its flag."""
    from megatron.config.data import add_post_training_data_arguments

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_post_training_arguments(parser)
    add_post_training_data_arguments(parser)

    def refuse(message):  # argparse would print usage and exit
        raise ConfigError(f"invalid arguments:\n  - {message} (finetune_gpt.py --task sft|dpo ...)")

    parser.error = refuse
    ns, rest = parser.parse_known_args(argv)
    problems = []
    if not ns.dpo_beta > 0:
        problems.append(f"--dpo-beta must be > 0 (got {ns.dpo_beta})")
    if not 0.0 <= ns.label_smoothing < 0.5:
        problems.append(f"--label-smoothing must lie in [0, 0.5) (got {ns.label_smoothing})")
    if ns.label_smoothing and ns.dpo_loss not in ("sigmoid", "robust"):
        problems.append(f"--label-smoothing applies to --dpo-loss sigmoid or robust, not {ns.dpo_loss}")
    if ns.rpo_alpha is not None and ns.rpo_alpha < 0:
        problems.append(f"--rpo-alpha must be >= 0 (got {ns.rpo_alpha})")
    if ns.task == "sft":
        given = [flag for flag, value, default in (
            ("--dpo-beta", ns.dpo_beta, PostTrainingConfig.dpo_beta), ("--dpo-loss", ns.dpo_loss, "sigmoid"),
            ("--label-smoothing", ns.label_smoothing, 0.0), ("--rpo-alpha", ns.rpo_alpha, None),
            ("--ref-logps-path", ns.ref_logps_path, None), ("--recompute-ref-logps", ns.recompute_ref_logps, False))
            if value != default]
        if given:
            problems.append(f"{', '.join(given)} configure DPO and do nothing with --task sft: drop them or use "
                            "--task dpo")
    if problems:
        raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(problems))
    return PostTrainingConfig(task=ns.task, dpo_beta=ns.dpo_beta, dpo_loss=ns.dpo_loss,
                              label_smoothing=ns.label_smoothing, rpo_alpha=ns.rpo_alpha,
                              ref_logps_path=ns.ref_logps_path, recompute_ref_logps=ns.recompute_ref_logps,
                              packing=ns.packing, overlong_examples=ns.overlong_examples), rest
