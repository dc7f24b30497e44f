"""Upstream's own forward of a saved checkpoint (run by make_fixtures.py --stage logits, side environment only).

Launched like the training run (mpiexec, same flags, --load = the saved checkpoint): builds the model
and loads the checkpoint through upstream's setup_model_and_optimizer (DeepSpeed engine, as in
pretrain()), then runs the forward in eval mode on the token sequences in $TOKENS (int64 [b, s])
and writes the logits over the whole padded vocabulary, float32 [b, s, padded_vocab], to $LOGITS.
With $BATCH (int64 [n, s + 1], samples as the data loader serves them), it also writes upstream's
per-token loss of each sample (tensor_parallel.vocab_parallel_cross_entropy, float32 [n, s]) to
$BATCH_LOSS.
Tensor-parallel shards are gathered along the vocabulary; with pipeline parallelism the stages are
run in order and the activation is sent from stage to stage.
"""

import os
import sys

import numpy as np
import torch

import pretrain_gpt_alcf
from megatron import get_args, get_tokenizer
from megatron.core import mpu, tensor_parallel
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
    n_fixed = tokens.shape[0]
    labels = None
    if os.environ.get("BATCH"):
        batch = torch.from_numpy(np.load(os.environ["BATCH"])).long()
        tokens = torch.cat([tokens, batch[:, :-1]])
        labels = batch[:, 1:]
    attention_mask, _, position_ids = get_ltor_masks_and_position_ids(
        tokens, get_tokenizer().eod, args.reset_position_ids, args.reset_attention_mask, args.eod_mask_loss)
    local = None  # this tensor-parallel rank's logits, [s, b, V/tp], on the last pipeline stage
    with torch.no_grad():
        if args.no_pipeline_parallel:
            out, _ = engine.module(tokens, position_ids, attention_mask)  # [b, s, V/tp]
            local = out.transpose(0, 1)
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
            else:
                local = x
    if local is not None:
        logits = gather_vocab(local[:, :n_fixed].float()).transpose(0, 1).contiguous()  # [b, s, V]
        if labels is not None:
            losses = tensor_parallel.vocab_parallel_cross_entropy(
                local[:, n_fixed:].float().contiguous(), labels.transpose(0, 1).contiguous())
            losses = losses.transpose(0, 1).contiguous()  # [n, s]
        if mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_data_parallel_rank() == 0:
            np.save(os.environ["LOGITS"], logits.numpy().astype(np.float32))
            print(f"wrote logits {tuple(logits.shape)} at iteration {args.iteration}", flush=True)
            if labels is not None:
                np.save(os.environ["BATCH_LOSS"], losses.numpy().astype(np.float32))
                print(f"batch loss {losses.mean().item():.6f}", flush=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    sys.exit(0)
