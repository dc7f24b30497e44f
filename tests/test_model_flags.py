"""Model-side flags change what they should: --kv-channels (head size), bf16 attention as upstream's (query-key
layer scaling, --attention-softmax-in-fp32, flash),
--adjust-word-embedding-init/--word-embedding-init-std, selective and block recomputation (same gradients,
fewer saved activations), in one process without torch.distributed."""

import pytest
import torch

from megatron.config.arguments import parse_args
from megatron.distributed.parallel_state import ParallelState
from megatron.model import GPTModel

BASE = ["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4", "--num-key-value-heads", "2",
        "--ffn-hidden-size", "64", "--seq-length", "16", "--normalization", "rmsnorm", "--swiglu",
        "--use-rotary-position-embeddings", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--mock-data", "--vocab-size", "63", "--train-iters", "1"]


def model(*flags, dtype=torch.float32):
    run = parse_args([*BASE, *flags])
    return GPTModel(run.model.replace(vocab_size=64), ParallelState.single(), seed=5).to(dtype), run


def tokens():
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def test_kv_channels_sets_the_head_size_apart_from_hidden_over_heads():
    m, run = model("--kv-channels", "16")  # 4 heads × 16 = 64 query width with hidden 32
    assert run.model.head_dim == 16
    qkv = m.layers[0].attention.qkv.weight
    assert tuple(qkv.shape) == ((4 + 2 * 2) * 16, 32)
    assert tuple(m.layers[0].attention.dense.weight.shape) == (32, 64)
    loss = m(tokens(), labels=tokens()).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert run.model.num_parameters() == sum(p.numel() for p in m.parameters()) - (
        run.model.padded_vocab_size() - 64) * 32  # the count formula follows the wider projections (no padding)


def _upstream_core_attention(q, k, v, layer_number, apply_query_key_layer_scaling, attention_softmax_in_fp32):
    """argonne-lcf/Megatron-DeepSpeed's CoreAttention.forward with FusedScaleMaskSoftmax.forward_torch_softmax
    (megatron/model/transformer.py, fused_softmax.py; --no-masked-softmax-fusion, causal mask, bf16), transcribed:
    inputs [sq, b, np, hn] as upstream lays them out."""
    import math

    softmax_in_fp32 = attention_softmax_in_fp32 or apply_query_key_layer_scaling
    layer_number = max(1, layer_number)
    coeff = None
    norm_factor = math.sqrt(q.size(3))
    if apply_query_key_layer_scaling:
        coeff = layer_number
        norm_factor *= coeff
    output_size = (q.size(1), q.size(2), q.size(0), k.size(0))
    query_layer = q.reshape(output_size[2], output_size[0] * output_size[1], -1)
    key_layer = k.reshape(output_size[3], output_size[0] * output_size[1], -1)
    buffer = torch.empty(output_size[0] * output_size[1], output_size[2], output_size[3], dtype=q.dtype)
    matmul_result = torch.baddbmm(buffer, query_layer.transpose(0, 1), key_layer.transpose(0, 1).transpose(1, 2),
                                  beta=0.0, alpha=(1.0 / norm_factor))
    attention_scores = matmul_result.view(*output_size)
    sq, sk = attention_scores.shape[-2:]
    mask = torch.tril(torch.ones(1, 1, sq, sk)) < 0.5  # get_ltor_masks_and_position_ids: True = masked
    x = attention_scores  # forward_torch_softmax (input_in_bf16)
    if softmax_in_fp32:
        x = x.float()
    if coeff is not None:
        x = x * coeff
    x = x.masked_fill_(mask, -10000.0)  # attention_mask_func
    probs = torch.nn.Softmax(dim=-1)(x)
    if softmax_in_fp32:
        probs = probs.bfloat16()
    output_size = (v.size(1), v.size(2), q.size(0), v.size(3))
    value_layer = v.reshape(v.size(0), output_size[0] * output_size[1], -1)
    probs = probs.view(output_size[0] * output_size[1], output_size[2], -1)
    context = torch.bmm(probs, value_layer.transpose(0, 1)).view(*output_size)
    return context.permute(2, 0, 1, 3).contiguous()  # [sq, b, np, hn]


@pytest.mark.parametrize("flags, scaling, fp32", [
    ((), True, False),  # upstream's default: query-key layer scaling, so the softmax is in fp32
    (("--no-query-key-layer-scaling",), False, False),  # softmax in bf16
    (("--no-query-key-layer-scaling", "--attention-softmax-in-fp32"), False, True),  # only the softmax in fp32
])
def test_bf16_attention_without_flash_is_upstreams_core_attention(flags, scaling, fp32):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 16, 4, 8, generator=g).mul(4).to(torch.bfloat16) for _ in range(3))  # [b, s, h, d]
    m, run = model(*flags)
    assert run.model.apply_query_key_layer_scaling == scaling and not run.model.flash_attention
    for index in (0, 2):  # layer numbers 1 and 3
        ours = m.layers[index].attention._attend(q, k, v)
        theirs = _upstream_core_attention(*(t.transpose(0, 1) for t in (q, k, v)), index + 1, scaling, fp32)
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, theirs.transpose(0, 1)), (flags, index)
    # the test tells the cases apart: layer 3 with and without scaling (bf16 scores of QKᵀ/(√d·3), then × 3 in
    # fp32), and this framework's former attention (bf16 SDPA; all of it in fp32 with --attention-softmax-in-fp32)
    args = [t.transpose(0, 1) for t in (q, k, v)]
    assert not torch.equal(_upstream_core_attention(*args, 3, True, False),
                           _upstream_core_attention(*args, 3, False, False))
    import torch.nn.functional as F

    former = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
    former_fp32 = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)),
                                                 is_causal=True).transpose(1, 2).to(torch.bfloat16)
    ours = m.layers[0].attention._attend(q, k, v)
    assert not torch.equal(ours, former) and not torch.equal(ours, former_fp32)


def test_flash_attention_flags_run_sdpa_whatever_the_softmax_flags():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 16, 4, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
    for flags in (("--use-flash-attn-builder",), ("--use-flash-attn-v2", "--no-query-key-layer-scaling"),
                  ("--use-flash-attn", "--attention-softmax-in-fp32")):
        m, run = model(*flags)
        assert run.model.flash_attention
        assert torch.equal(m.layers[1].attention._attend(q, k, v), sdpa), flags


def test_adjust_word_embedding_init_uses_the_word_embedding_std():
    plain, _ = model("--init-method-std", "0.02")
    adjusted, run = model("--init-method-std", "0.02", "--adjust-word-embedding-init",
                          "--word-embedding-init-std", "0.5")
    assert run.model.word_embedding_init_std == 0.5
    assert plain.embedding.word_embeddings.weight[:64].std().item() == pytest.approx(0.02, rel=0.15)
    assert adjusted.embedding.word_embeddings.weight[:64].std().item() == pytest.approx(0.5, rel=0.15)
    assert torch.equal(plain.layers[0].mlp.fc1.weight, adjusted.layers[0].mlp.fc1.weight)  # other weights alike
    assert model("--word-embedding-init-std", "0.5")[1].model.word_embedding_init_std is None  # needs the switch


def _grads_and_saved(m):
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    m.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(tokens(), labels=tokens()).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}, sum(saved)


@pytest.mark.parametrize("flags", [["--recompute-activations"],
                                   ["--recompute-granularity", "full", "--recompute-method", "block",
                                    "--recompute-num-layers", "2"],
                                   ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                    "--recompute-num-layers", "3"]])
def test_recompute_flags_keep_the_gradients_and_save_fewer_activations(flags):
    reference, saved_reference = _grads_and_saved(model()[0])
    grads, saved = _grads_and_saved(model(*flags)[0])
    assert saved < saved_reference
    for name, g in reference.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6)


def test_recompute_flags_map_onto_the_model_and_conflicts_are_named():
    from megatron.config.arguments import ConfigError

    m = parse_args([*BASE, "--recompute-granularity", "full", "--recompute-method", "block",
                    "--recompute-num-layers", "2"]).model
    assert m.checkpoint_activations and m.recompute_method == "block" and m.recomputed_layers == 2
    assert parse_args([*BASE, "--recompute-activations"]).model.recompute_core_attention
    assert parse_args([*BASE, "--checkpoint-activations", "--checkpoint-num-layers", "2"]).model.recomputed_layers == 3
    with pytest.raises(ConfigError, match="--checkpoint-activations and --recompute-activations"):
        parse_args([*BASE, "--checkpoint-activations", "--recompute-activations"])
    with pytest.raises(ConfigError, match="--recompute-method block is supported with --pipeline-model-parallel"):
        parse_args([*BASE, "--recompute-granularity", "full", "--recompute-method", "block",
                    "--pipeline-model-parallel-size", "2"])


GPT = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
       "--hidden-dropout", "0", "--attention-dropout", "0", "--mock-data", "--vocab-size", "64", "--train-iters", "1"]


def gpt(*flags):
    run = parse_args([*GPT, *flags])
    return GPTModel(run.model.replace(vocab_size=64), ParallelState.single(), seed=5)


def test_apply_layernorm_1p_stores_the_gain_centred_on_zero_with_the_same_function():
    plain, centred = gpt(), gpt("--apply-layernorm-1p")
    norm = centred.layers[0].input_norm
    assert torch.equal(norm.weight, torch.zeros(32)) and torch.equal(plain.layers[0].input_norm.weight, torch.ones(32))
    with torch.no_grad():
        torch.testing.assert_close(centred(tokens()), plain(tokens()))  # gain 1 + 0 == 1 at initialisation
        norm.weight.fill_(0.5)
        x = torch.randn(3, 32)
        torch.testing.assert_close(norm(x), torch.nn.functional.layer_norm(x, (32,), torch.full((32,), 1.5), norm.bias))
    from megatron.config.arguments import ConfigError

    with pytest.raises(ConfigError, match="--apply-layernorm-1p applies to LayerNorm"):
        parse_args([*GPT, "--apply-layernorm-1p", "--normalization", "rmsnorm"])


def test_squared_relu_replaces_the_gelu_of_the_mlp():
    m = gpt("--squared-relu")
    mlp = m.layers[0].mlp
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.fc2(torch.relu(mlp.fc1(x)) ** 2))
        assert not torch.allclose(mlp(x), gpt().layers[0].mlp(x))
    from megatron.checkpoint import hf_gpt2

    assert any("squared ReLU" in e for e in hf_gpt2.inexpressible(m.config))  # converters refuse it
