"""Upstream's numerics and initialisation flags change what they should: --rotary-percent (partial RoPE),
--fp32-residual-connection, the GeLU choice (--openai-gelu / --no-bias-gelu-fusion), --init-method-xavier-uniform,
--data-parallel-random-init and --reset-attention-mask (document-wise causal attention), in the model, through
tensor and pipeline parallelism (one 2-rank case), and in the Hugging Face converters."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.config.arguments import ConfigError, parse_args
from megatron.distributed.parallel_state import ParallelState
from megatron.model import GPTModel, gather_logits
from megatron.model.attention import document_attention_mask, document_ids_from_tokens
from megatron.model.rotary import apply_rotary, rotary_cos_sin, split_qkv_rotary
from multirank import run_ranks

VOCAB, SEQ, EOD = 64, 16, 0  # VOCAB: the model's tokens (NullTokenizer --vocab-size VOCAB - 1 gives VOCAB, as upstream)
LLAMA = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-key-value-heads", "2",
         "--ffn-hidden-size", "64", "--seq-length", str(SEQ), "--normalization", "rmsnorm", "--swiglu",
         "--use-rotary-position-embeddings", "--hidden-dropout", "0", "--attention-dropout", "0",
         "--mock-data", "--vocab-size", str(VOCAB - 1), "--train-iters", "1"]
GPT = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
       "--hidden-dropout", "0", "--attention-dropout", "0", "--mock-data", "--vocab-size", str(VOCAB - 1),
       "--train-iters", "1"]


def build(base, *flags, ps=None):
    run = parse_args([*base, *flags])
    return GPTModel(run.model, ps or ParallelState.single(), seed=7), run


def tokens(seed=0, batch=2):
    return torch.randint(1, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


# ---- --rotary-percent ----------------------------------------------------------------------------------------

def _upstream_partial_rope(t, positions, rot_dim, theta):
    """Upstream's formula (RotaryEmbedding(rot_dim) + apply_rotary_pos_emb): rotate-half on t[..., :rot_dim]
    with frequencies theta^(-2i/rot_dim), the rest passed through. t: [b, s, h, d]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    freqs = positions.double().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), -1).unsqueeze(2)
    rot, rest = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = rot.chunk(2, -1)
    rotated = rot * emb.cos() + torch.cat((-x2, x1), -1) * emb.sin()
    return torch.cat((rotated, rest), -1)


def test_rotary_percent_rotates_only_the_first_dims_of_each_head_forward_and_backward():
    b, s, nq, nkv, d, rot = 2, 6, 4, 2, 8, 4
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    qkv = torch.randn(b, s, (nq + 2 * nkv) * d, dtype=torch.float64, requires_grad=True)
    q, k, v = split_qkv_rotary(qkv, nq, nkv, d, tuple(t.double() for t in rotary_cos_sin(positions, rot, 500.0)))
    q_in, k_in, v_in = qkv.detach().split([nq * d, nkv * d, nkv * d], -1)
    q_in, k_in = q_in.view(b, s, nq, d), k_in.view(b, s, nkv, d)
    # (our cos/sin are computed in float32, the reference in float64)
    torch.testing.assert_close(q, _upstream_partial_rope(q_in, positions, rot, 500.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, _upstream_partial_rope(k_in, positions, rot, 500.0), rtol=1e-6, atol=1e-6)
    assert torch.equal(q[..., rot:], q_in[..., rot:]) and not torch.allclose(q[..., :rot], q_in[..., :rot])
    grads = torch.randn(b, s, nq, d, dtype=torch.float64), torch.randn(b, s, nkv, d, dtype=torch.float64)
    (q * grads[0]).sum().add_((k * grads[1]).sum()).backward()
    reference = qkv.detach().clone().requires_grad_(True)
    rq, rk, _ = reference.split([nq * d, nkv * d, nkv * d], -1)
    cos, sin = (t.double() for t in rotary_cos_sin(positions, rot, 500.0))
    rq, rk = apply_rotary(rq.view(b, s, nq, d), cos, sin), apply_rotary(rk.reshape(b, s, nkv, d), cos, sin)
    (rq * grads[0]).sum().add_((rk * grads[1]).sum()).backward()
    torch.testing.assert_close(qkv.grad, reference.grad)


def test_rotary_percent_reaches_the_model_and_bad_values_are_named():
    full, _ = build(LLAMA)
    half, run = build(LLAMA, "--rotary-percent", "0.5")
    assert (run.model.head_dim, run.model.rotary_dim) == (8, 4)
    assert torch.equal(full.layers[0].attention.qkv.weight, half.layers[0].attention.qkv.weight)  # same weights
    with torch.no_grad():
        assert not torch.allclose(full(tokens()), half(tokens()))
    with pytest.raises(ConfigError, match="--rotary-percent 0.2 of head dim 8 rotates 1 dims"):
        parse_args(LLAMA + ["--rotary-percent", "0.2"])
    with pytest.raises(ConfigError, match="--rotary-percent 0.5 needs rotary position embeddings"):
        parse_args(GPT + ["--rotary-percent", "0.5"])
    from megatron.checkpoint import hf_llama

    assert any("--rotary-percent 0.5" in e for e in hf_llama.inexpressible(run.model))
    assert hf_llama.inexpressible(full.config) == []


# ---- --fp32-residual-connection -------------------------------------------------------------------------------

def test_fp32_residual_connection_keeps_the_residual_stream_fp32_under_bf16():
    seen = {}

    def record(name):
        return lambda module, args, out: seen.setdefault(name, []).append(
            (args[0].dtype, (out[0] if isinstance(out, tuple) else out).dtype))

    results = {}
    for flags in ([], ["--fp32-residual-connection"]):
        model, run = build(LLAMA, "--bf16", *flags)
        model = model.to(torch.bfloat16)
        seen.clear()
        handles = [model.embedding.register_forward_hook(record("embedding")),
                   model.layers[1].register_forward_hook(record("layer")),
                   model.layers[1].attention.qkv.register_forward_hook(record("qkv")),
                   model.final_norm.register_forward_hook(record("final_norm"))]
        with torch.no_grad():
            results[bool(flags)] = model(tokens()).float()
        for h in handles:
            h.remove()
        residual = torch.float32 if flags else torch.bfloat16
        assert seen["embedding"][0][1] == residual
        assert seen["layer"][0] == (residual, residual)  # a layer's input and output: the residual stream
        assert seen["qkv"][0][0] == torch.bfloat16  # the sublayers compute in the run's dtype
        assert seen["final_norm"][0] == (residual, torch.bfloat16)
    assert not torch.equal(results[False], results[True])
    with pytest.raises(ConfigError, match="--fp32-residual-connection.*--bf16 or --fp16"):
        parse_args(LLAMA + ["--fp32-residual-connection"])


# ---- GeLU: --openai-gelu, --no-bias-gelu-fusion ---------------------------------------------------------------

@pytest.mark.parametrize("flags, approximate", [
    ([], "tanh"),  # upstream's default: the fused bias-GeLU (tanh approximation)
    (["--no-bias-gelu-fusion"], "none"),  # upstream's F.gelu (erf)
    (["--disable-bias-linear"], "none"),  # no bias: upstream turns the fusion off
    (["--openai-gelu", "--no-bias-gelu-fusion"], "tanh"),
    (["--openai-gelu", "--disable-bias-linear"], "tanh"),
])
def test_the_gelu_of_the_mlp_is_upstreams_choice_and_equals_torchs(flags, approximate):
    model, run = build(GPT, *flags)
    assert run.model.gelu_approximation == approximate
    mlp = model.layers[0].mlp
    x = torch.randn(2, 5, 32) * 3
    with torch.no_grad():
        expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate=approximate))
        other = mlp.fc2(F.gelu(mlp.fc1(x), approximate="none" if approximate == "tanh" else "tanh"))
        got = mlp(x)
    assert torch.equal(got, expected) and not torch.equal(got, other)


def test_gelu_choice_round_trips_through_hugging_face_gpt2_and_bad_combinations_are_named():
    transformers = pytest.importorskip("transformers")
    from megatron.checkpoint import hf_gpt2

    for flags, name in (([], "gelu_new"), (["--no-bias-gelu-fusion"], "gelu")):
        model, run = build(GPT, *flags)
        hf_cfg = hf_gpt2.hf_config(run.model, torch.float32)
        assert hf_cfg.activation_function == name
        assert hf_gpt2.config_from_hf(hf_cfg, "test").gelu_approximation == run.model.gelu_approximation
        hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
        sd = model.state_dict()
        converted = {}
        for prefix in ["embedding."] + [f"layers.{i}." for i in range(2)] + ["final_norm."]:
            group = {k: (v[:VOCAB] if k == "embedding.word_embeddings.weight" else v)
                     for k, v in sd.items() if k.startswith(prefix)}
            converted.update(hf_gpt2.to_hf(prefix, group, run.model))
        converted["lm_head.weight"] = converted["transformer.wte.weight"]
        hf.load_state_dict(converted, strict=False)
        with torch.no_grad():
            torch.testing.assert_close(gather_logits(model.eval()(tokens()), ParallelState.single(), VOCAB),
                                       hf(tokens()).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="--openai-gelu .* --swiglu"):
        parse_args(LLAMA + ["--openai-gelu"])


# ---- --init-method-xavier-uniform -----------------------------------------------------------------------------

def test_init_method_xavier_uniform_draws_every_weight_matrix_within_its_full_shapes_bound():
    normal, _ = build(GPT, "--untie-embeddings-and-output-weights")
    xavier, run = build(GPT, "--untie-embeddings-and-output-weights", "--init-method-xavier-uniform")
    assert run.model.init_method == "xavier_uniform"
    h, f = 32, 128
    shapes = {"layers.0.attention.qkv.weight": (3 * h, h), "layers.0.attention.dense.weight": (h, h),
              "layers.1.mlp.fc1.weight": (f, h), "layers.1.mlp.fc2.weight": (h, f),
              "embedding.word_embeddings.weight": (VOCAB, h), "embedding.position_embeddings.weight": (SEQ, h),
              "output_layer.weight": (VOCAB, h)}
    params = dict(xavier.named_parameters())
    for name, (fan_out, fan_in) in shapes.items():
        weight = params[name][:fan_out]  # vocabulary padding rows stay zero
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound, name
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.15), name
    assert torch.count_nonzero(params["embedding.word_embeddings.weight"][VOCAB:]) == 0
    assert torch.equal(params["layers.0.input_norm.weight"], torch.ones(h))  # norms and biases as before
    assert torch.count_nonzero(params["layers.0.attention.qkv.bias"]) == 0
    assert normal.layers[0].mlp.fc2.weight.std() < 0.02  # normal init scales output projections by 1/sqrt(2L)
    adjusted, _ = build(GPT, "--init-method-xavier-uniform", "--adjust-word-embedding-init",
                        "--word-embedding-init-std", "0.5")
    assert adjusted.embedding.word_embeddings.weight[:VOCAB].std().item() == pytest.approx(0.5, rel=0.15)


# ---- --reset-attention-mask -----------------------------------------------------------------------------------

def _upstream_mask(data, eod):
    """get_ltor_masks_and_position_ids(reset_attention_mask=True): True = may attend."""
    b, s = data.shape
    mask = torch.tril(torch.ones(b, s, s))
    for i in range(b):
        for j in (data[i] == eod).nonzero().flatten().tolist():
            mask[i, (j + 1):, :(j + 1)] = 0
    return mask.unsqueeze(1) > 0.5


def _two_documents(seed):
    t = tokens(seed)
    t[:, 6] = EOD  # document 1: tokens 0..6 (its EOD included), document 2: 7..15
    t[1, 11] = EOD  # row 1 has a third document
    return t


def test_document_mask_equals_upstreams_and_blocks_attention_across_documents():
    t = _two_documents(0)
    ids = document_ids_from_tokens(t, EOD)
    assert torch.equal(document_attention_mask(ids), _upstream_mask(t, EOD))
    model, run = build(LLAMA, "--reset-attention-mask", "--reset-position-ids")
    assert run.data.reset_attention_mask
    from megatron.training.engine import position_ids_and_loss_mask

    changed = t.clone()
    changed[:, :6] = tokens(9)[:, :6]  # other tokens in document 1 only
    with torch.no_grad():
        outs = {}
        for name, x in (("t", t), ("changed", changed)):
            pos, _ = position_ids_and_loss_mask(x, EOD, True, False)
            outs[name] = model(x, position_ids=pos, document_ids=document_ids_from_tokens(x, EOD))
            outs[name + "-causal"] = model(x, position_ids=pos)
        alone = model(t[:1, 7:11], position_ids=torch.arange(4).unsqueeze(0))  # document 2 of row 0 on its own
    assert torch.equal(outs["t"][:, 7:], outs["changed"][:, 7:])  # later documents never see document 1
    assert not torch.allclose(outs["t-causal"][:, 7:], outs["changed-causal"][:, 7:])  # plain causal does
    torch.testing.assert_close(outs["t"][:1, 7:11], alone, rtol=1e-5, atol=1e-5)


def test_reset_attention_mask_with_recomputation_and_its_batches_and_refusals():
    t = _two_documents(1)
    ids = document_ids_from_tokens(t, EOD)
    grads = []
    for flags in ([], ["--recompute-activations"], ["--checkpoint-activations"]):
        model, _ = build(LLAMA, "--reset-attention-mask", *flags)
        model.train()
        model(t, labels=t, document_ids=ids).mean().backward()
        grads.append(model.layers[0].attention.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], grads[2])
    from megatron.training.engine import EngineConfigError, prepare_batch

    batch = {"tokens": torch.cat([t, t[:, :1]], dim=1)}
    x = prepare_batch(batch, ParallelState.single(), torch.device("cpu"), EOD, reset_attention_mask=True)
    assert torch.equal(x.document_ids, ids) and len(x.pipe_inputs()) == 3
    assert torch.equal(x.model_kwargs()["document_ids"], ids)
    assert "document_ids" not in prepare_batch(batch, ParallelState.single(), torch.device("cpu"), EOD).model_kwargs()
    with pytest.raises(EngineConfigError, match="--reset-attention-mask needs a tokenizer with an EOD"):
        prepare_batch(batch, ParallelState.single(), torch.device("cpu"), None, reset_attention_mask=True)


# ---- one 2-rank case: --data-parallel-random-init (dp 2), and document masks + partial RoPE under tp 2, pp 2 ---

def _two_rank_checks(rank, world_size):
    import deepspeed

    from megatron.config.parallel import ParallelConfig
    from megatron.core.random import seed_model_parallel_rng, tensor_parallel_rng
    from megatron.model import shard_state_dict
    from megatron.model.pipeline import build_pipeline_module, pipe_state_dict_to_model

    out = {}
    flags = LLAMA + ["--reset-attention-mask", "--rotary-percent", "0.5"]
    run = parse_args(flags)
    config = run.model
    # data-parallel random init: the dropout streams of the two dp replicas
    dp_ps = ParallelState.build(ParallelConfig(), config, world_size=world_size)
    assert dp_ps.dp_size == 2
    for on in (False, True):
        seed_model_parallel_rng(1234, dp_ps, "cpu", data_parallel_random_init=on)
        default = F.dropout(torch.ones(256), 0.5)
        with tensor_parallel_rng(2):
            tp_stream = F.dropout(torch.ones(256), 0.5)
        out[f"dropout-{on}"] = (default, tp_stream)
    out["weights"] = GPTModel(config, dp_ps, seed=7).state_dict()["layers.0.attention.qkv.weight"]
    seed_model_parallel_rng(1234, dp_ps, "cpu")

    t = _two_documents(3)
    ids = document_ids_from_tokens(t, EOD)
    reference = GPTModel(config, ParallelState.single(), seed=7).eval()
    with torch.no_grad():
        expected = reference(t, document_ids=ids)
    # tensor parallel: 2 ranks hold half the heads each
    tp_ps = ParallelState.build(ParallelConfig(tensor_model_parallel_size=2), config, world_size=world_size)
    tp_model = GPTModel(config, tp_ps, seed=7).eval()
    tp_model.load_state_dict(shard_state_dict(reference.state_dict(), config, 2, tp_ps.tp_rank))
    with torch.no_grad():
        out["tp"] = (gather_logits(tp_model(t, document_ids=ids), tp_ps, VOCAB) - expected[..., :VOCAB]).abs().max()
    # pipeline parallel: the document ids travel with the activations from stage 0 to stage 1
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    pp_ps = ParallelState.build(ParallelConfig(pipeline_model_parallel_size=2), config, world_size=world_size)
    pipe = build_pipeline_module(config, pp_ps, seed=7)
    full = reference.state_dict()
    for local_index, layer in enumerate(pipe.forward_funcs):
        if isinstance(layer, torch.nn.Module):
            named = pipe_state_dict_to_model(pipe._local_start + local_index, layer.state_dict(), config)
            out.setdefault("pipe-init", []).extend(torch.equal(v, full[k]) for k, v in named.items())
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, optimizer=torch.optim.SGD(pipe.parameters(), lr=0.0),
        config={"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
                "gradient_clipping": 0.0})
    positions = torch.arange(SEQ).unsqueeze(0).expand(2, SEQ)
    loss_mask = torch.ones(2, SEQ)
    labels = torch.roll(t, -1, 1)
    loss = engine.eval_batch(iter([((t, positions, ids), (labels, loss_mask))]), return_logits=False,
                             compute_loss=True, reduce_output="avg", bcast_loss=True)
    with torch.no_grad():
        ref_loss = reference(t, labels=labels, document_ids=ids).mean()
        causal_loss = reference(t, labels=labels).mean()
    out["pipe"] = (float(loss), float(ref_loss), float(causal_loss))
    return out


def test_two_ranks_data_parallel_random_init_and_document_masks_through_tp_and_pp():
    results = run_ranks(2, _two_rank_checks, timeout=300)
    r0, r1 = results
    for i in range(2):  # without the flag both replicas draw the same dropout masks; with it they differ
        assert torch.equal(r0["dropout-False"][i], r1["dropout-False"][i])
        assert not torch.equal(r0["dropout-True"][i], r1["dropout-True"][i])
    assert torch.equal(r0["dropout-True"][0], r0["dropout-False"][0])  # dp rank 0 keeps the run's own seed
    assert torch.equal(r0["weights"], r1["weights"])  # the weights are the same on every replica
    assert r0["tp"] < 1e-5 and r1["tp"] < 1e-5
    assert all(r0["pipe-init"]) and all(r1["pipe-init"])
    loss, ref_loss, causal_loss = r1["pipe"]
    assert loss == pytest.approx(ref_loss, rel=1e-5) and abs(ref_loss - causal_loss) > 1e-4
    assert parse_args(LLAMA + ["--data-parallel-random-init"]).training.data_parallel_random_init


def test_muonclip_max_logits_count_only_the_pairs_a_document_mask_allows():
    model, _ = build(LLAMA, "--reset-attention-mask")
    attention = model.layers[0].attention.train()
    t = _two_documents(4)
    hidden = torch.randn(2, SEQ, 32)
    positions = torch.arange(SEQ).unsqueeze(0).expand(2, SEQ)
    mask = document_attention_mask(document_ids_from_tokens(t, EOD))
    found = {}
    for name, m in (("causal", None), ("documents", mask)):
        attention.record_max_logits()
        attention(hidden, positions, None, m)
        found[name] = attention.max_logits
    qkv = attention.qkv(hidden)
    cos_sin = rotary_cos_sin(positions, 8, model.config.rope_theta)
    q, k, _ = split_qkv_rotary(qkv.detach(), 4, 2, 8, cos_sin)
    scores = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(2, dim=2)) / math.sqrt(8)
    for name, allowed in (("causal", torch.ones(SEQ, SEQ, dtype=torch.bool).tril()), ("documents", mask)):
        expected = scores.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3))
        torch.testing.assert_close(found[name], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(found["causal"], found["documents"])


def test_data_parallel_random_init_refuses_a_checkpoint_saved_without_it():
    """Upstream's check_checkpoint_args: --data-parallel-random-init resumes only a checkpoint saved with it."""
    from megatron.checkpoint.resume import CheckpointDescription, plan_resume
    from megatron.distributed.parallel_state import ParallelState

    def plan(saved, *flags):
        run = parse_args(LLAMA + list(flags))
        optimizer = run.training.optimizer.optimizer
        args = {"optimizer": optimizer} if saved is None else {"optimizer": optimizer,
                                                               "data_parallel_random_init": saved}
        desc = CheckpointDescription("ours", "ckpt", "global_step1", "ckpt/global_step1", None, args,
                                     run.model, optimizer, has_optimizer_state=True, has_rng=True, lr_scheduler=None)
        return plan_resume(desc, run, ParallelState.single())

    with pytest.raises(ConfigError, match="--data-parallel-random-init is given, but the checkpoint was saved"):
        plan(False, "--data-parallel-random-init")
    plan(True, "--data-parallel-random-init")
    plan(None, "--data-parallel-random-init")  # records no value: nothing to compare
    plan(False, "--data-parallel-random-init", "--finetune")
    plan(True)  # upstream compares only with the flag
