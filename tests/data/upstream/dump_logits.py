"""Upstream's own forward of a saved checkpoint (run by make_fixtures.py --stage logits, side environment only).

Launched like the training run (mpiexec, same flags, --load = the saved checkpoint): builds the model
and loads the checkpoint through upstream's setup_model_and_optimizer (DeepSpeed engine, as in
pretrain()), then runs the forward in eval mode on the token sequences in $TOKENS (int64 [b, s])
and writes the logits over the whole padded vocabulary, float32 [b, s, padded_vocab], to $LOGITS.
Tensor-parallel shards are gathered along the vocabulary; with pipeline parallelism the stages are
run in order and the activation is sent from stage to stage.
"""

import os
import sys

import numpy as np
import torch

import pretrain_gpt_alcf
from megatron import get_args, get_tokenizer
from megatron.core import mpu
from megatron.core.enums import ModelType
from megatron.initialize import initialize_megatron
from megatron.training import _create_ds_config_dict, setup_model_and_optimizer
from megatron.utils import get_ltor_masks_and_position_ids


def gather_vocab(local):
    """[.., V/tp] on each tensor-parallel rank -> [.., V]."""
    tp = mpu.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(parts, local.contiguous(), group=mpu.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def main():
    initialize_megatron(allow_no_cuda=True)
    args = get_args()
    args.deepspeed_config_dict = _create_ds_config_dict()  # as pretrain() does before building the model
    model, _, _ = setup_model_and_optimizer(pretrain_gpt_alcf.model_provider, ModelType.encoder_or_decoder)
    engine = model[0]
    engine.eval()
    tokens = torch.from_numpy(np.load(os.environ["TOKENS"])).long()
    attention_mask, _, position_ids = get_ltor_masks_and_position_ids(
        tokens, get_tokenizer().eod, args.reset_position_ids, args.reset_attention_mask, args.eod_mask_loss)
    with torch.no_grad():
        if args.no_pipeline_parallel:
            logits, _ = engine.module(tokens, position_ids, attention_mask)  # [b, s, V/tp]
            logits = gather_vocab(logits.float())
        else:
            module = engine.module  # GPTModelPipe: the local stage's layers
            stages = mpu.get_pipeline_model_parallel_world_size()
            stage = mpu.get_pipeline_model_parallel_rank()
            shape = (tokens.shape[1], tokens.shape[0], args.hidden_size)  # [s, b, h] between stages
            dtype = torch.bfloat16 if args.bf16 else torch.float32
            if stage == 0:
                x = module((tokens, position_ids, attention_mask))
            else:
                x = torch.empty(shape, dtype=dtype)
                torch.distributed.recv(x, src=mpu.get_pipeline_model_parallel_prev_rank())
                x = module(x)
            if stage < stages - 1:
                torch.distributed.send(x.contiguous(), dst=mpu.get_pipeline_model_parallel_next_rank())
                logits = None
            else:
                logits = gather_vocab(x.float()).transpose(0, 1).contiguous()  # [s, b, V] -> [b, s, V]
    if logits is not None and mpu.get_tensor_model_parallel_rank() == 0:
        np.save(os.environ["LOGITS"], logits.numpy().astype(np.float32))
        print(f"wrote logits {tuple(logits.shape)} at iteration {args.iteration}", flush=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    sys.exit(0)
