"""Model-side flags change what they should: --kv-channels (head size), --attention-softmax-in-fp32,
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
        "--mock-data", "--vocab-size", "64", "--train-iters", "1"]


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


def test_attention_softmax_in_fp32_computes_bf16_attention_in_fp32():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 16, 4, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    plain = model()[0].layers[0].attention._attend(q, k, v)
    fp32 = model("--attention-softmax-in-fp32")[0].layers[0].attention._attend(q, k, v)
    exact = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), is_causal=True)
    assert fp32.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(fp32, exact.transpose(1, 2).to(torch.bfloat16))  # scores, softmax and sum in fp32
    assert not torch.equal(plain, fp32)  # bf16 SDPA rounds on the way


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
