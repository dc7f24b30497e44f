"""Single-process checks of megatron.model: parameter names/shapes, init, tp sharding of state dicts,
pipe layer naming, bf16, input errors, and logits identical to Hugging Face GPT-2 / Llama."""

import pytest
import torch

from megatron.distributed.parallel_state import ParallelState
from megatron.model import GPTModel, gather_logits, merge_state_dicts, partition_of, shard_state_dict
from model_parity_ranks import VOCAB, batch, gpt_config, llama_config


def test_gptmodel_parameter_names_and_shapes_follow_the_contract():
    g, l = GPTModel(gpt_config()).state_dict(), GPTModel(llama_config()).state_dict()
    assert g["embedding.word_embeddings.weight"].shape == (104, 64)  # 100 padded to a multiple of 8
    assert g["embedding.position_embeddings.weight"].shape == (16, 64)
    assert g["layers.1.attention.qkv.weight"].shape == (3 * 64, 64) and "layers.1.attention.qkv.bias" in g
    assert g["layers.0.mlp.fc1.weight"].shape == (256, 64) and g["layers.0.mlp.fc2.weight"].shape == (64, 256)
    assert "output_layer.weight" not in g and "final_norm.bias" in g and "layers.0.input_norm.bias" in g
    assert l["layers.0.attention.qkv.weight"].shape == ((8 + 2 * 4) * 8, 64)
    assert l["layers.0.attention.dense.weight"].shape == (64, 64)
    assert l["layers.0.mlp.fc1.weight"].shape == (2 * 96, 64) and l["layers.0.mlp.fc2.weight"].shape == (64, 96)
    assert l["output_layer.weight"].shape == (104, 64)
    assert not any(k.endswith(".bias") for k in l) and "embedding.position_embeddings.weight" not in l


def test_init_is_deterministic_scaled_for_output_projections_and_zero_on_vocab_padding():
    a, b, c = GPTModel(gpt_config(), seed=1), GPTModel(gpt_config(), seed=1), GPTModel(gpt_config(), seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.mlp.fc1.weight"], sc["layers.0.mlp.fc1.weight"])
    assert sa["layers.0.mlp.fc2.weight"].std() < 0.6 * sa["layers.0.mlp.fc1.weight"].std()  # 1/sqrt(2L) = 0.5
    assert torch.all(sa["embedding.word_embeddings.weight"][VOCAB:] == 0)
    assert torch.all(sa["layers.0.attention.qkv.bias"] == 0) and torch.all(sa["final_norm.weight"] == 1)


@pytest.mark.parametrize("make_config", [gpt_config, llama_config], ids=["gpt", "llama"])
@pytest.mark.parametrize("tp", [2, 4])
def test_shard_then_merge_state_dict_roundtrips_and_splits_qkv_and_swiglu_per_rank(make_config, tp):
    config = make_config()
    full = GPTModel(config).state_dict()
    shards = [shard_state_dict(full, config, tp, r) for r in range(tp)]
    padded = config.padded_vocab_size(tp)
    assert shards[0]["embedding.word_embeddings.weight"].shape == (padded // tp, 64)
    merged = merge_state_dicts(shards, config)
    for name, tensor in full.items():
        if partition_of(name, config).vocab:
            assert merged[name].shape[0] == padded and torch.all(merged[name][VOCAB:] == 0)
            assert torch.equal(merged[name][:VOCAB], tensor[:VOCAB])
        else:
            assert torch.equal(merged[name], tensor), name
    d, nq, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    qkv = full["layers.0.attention.qkv.weight"]
    q, k, v = qkv.split([nq * d, nkv * d, nkv * d])
    last = tp - 1
    expected = torch.cat([q.chunk(tp)[last], k.chunk(tp)[last], v.chunk(tp)[last]])
    assert torch.equal(shards[last]["layers.0.attention.qkv.weight"], expected)
    if config.swiglu:
        gate, up = full["layers.0.mlp.fc1.weight"].chunk(2)
        assert torch.equal(shards[last]["layers.0.mlp.fc1.weight"], torch.cat([gate.chunk(tp)[last], up.chunk(tp)[last]]))
    assert torch.equal(shards[last]["layers.0.mlp.fc2.weight"], full["layers.0.mlp.fc2.weight"].chunk(tp, dim=1)[last])


def test_partition_of_rejects_unknown_names():
    with pytest.raises(KeyError, match="not a GPTModel parameter"):
        partition_of("layers.0.attention.rotary.inv_freq", gpt_config())


def test_pipe_layer_index_and_prefix_translate_every_parameter_both_ways():
    from megatron.model.pipeline import model_state_dict_to_pipe, pipe_layer_prefix, pipe_state_dict_to_model

    for config in (gpt_config(), llama_config()):
        full = GPTModel(config).state_dict()
        per_layer = model_state_dict_to_pipe(full, config)
        assert sorted(per_layer) == list(range(config.num_layers + 2)) + (
            [config.num_layers + 2] if config.untie_embeddings_and_output_weights else [])
        back = {}
        for index, layer_sd in per_layer.items():
            back.update(pipe_state_dict_to_model(index, layer_sd, config))
        assert back.keys() == full.keys()
        assert pipe_layer_prefix(config.num_layers + 2, config) == (
            "output_layer." if config.untie_embeddings_and_output_weights else "embedding.")
    with pytest.raises(ValueError, match="outside"):
        pipe_layer_prefix(99, gpt_config())


def test_gptmodel_runs_with_bf16_autocast_and_bf16_params():
    tokens, labels = batch()
    model = GPTModel(llama_config())
    fp32 = model(tokens, labels=labels).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(tokens, labels=labels)
    bf16 = model.to(torch.bfloat16)(tokens, labels=labels)
    assert autocast.dtype == torch.float32 and bf16.dtype == torch.float32
    torch.testing.assert_close(autocast.mean(), fp32, rtol=2e-2, atol=0)
    torch.testing.assert_close(bf16.mean(), fp32, rtol=2e-2, atol=0)
    bf16.mean().backward()
    assert model.layers[0].attention.qkv.weight.grad.dtype == torch.bfloat16


def test_gptmodel_rejects_pipeline_layouts_and_bad_tokens_with_clear_errors():
    ps = ParallelState(world_size=2, rank=0, pp_size=2)
    with pytest.raises(ValueError, match="build_pipeline_module"):
        GPTModel(gpt_config(), ps)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTModel(gpt_config(vocab_size=0))
    model = GPTModel(gpt_config())
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))


def _gpt2_state_dict(sd, config):
    out = {"transformer.wte.weight": sd["embedding.word_embeddings.weight"][:VOCAB],
           "transformer.wpe.weight": sd["embedding.position_embeddings.weight"],
           "transformer.ln_f.weight": sd["final_norm.weight"], "transformer.ln_f.bias": sd["final_norm.bias"]}
    out["lm_head.weight"] = out["transformer.wte.weight"]
    names = {"input_norm": "ln_1", "post_attention_norm": "ln_2", "attention.qkv": "attn.c_attn",
             "attention.dense": "attn.c_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(config.num_layers):
        for ours, theirs in names.items():
            weight = sd[f"layers.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = weight if "norm" in ours else weight.T  # HF Conv1D
            out[f"transformer.h.{i}.{theirs}.bias"] = sd[f"layers.{i}.{ours}.bias"]
    return out


def _llama_state_dict(sd, config):
    d, nq, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:VOCAB],
           "lm_head.weight": sd["output_layer.weight"][:VOCAB], "model.norm.weight": sd["final_norm.weight"]}
    for i in range(config.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        for proj, w in zip("qkv", sd[p + "attention.qkv.weight"].split([nq * d, nkv * d, nkv * d])):
            out[f"{q}self_attn.{proj}_proj.weight"] = w
        out[q + "self_attn.o_proj.weight"] = sd[p + "attention.dense.weight"]
        out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = sd[p + "mlp.fc1.weight"].chunk(2)
        out[q + "mlp.down_proj.weight"] = sd[p + "mlp.fc2.weight"]
        out[q + "input_layernorm.weight"] = sd[p + "input_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "post_attention_norm.weight"]
    return out


def test_logits_equal_hugging_face_gpt2_and_llama_with_the_same_weights():
    transformers = pytest.importorskip("transformers")
    tokens, _ = batch()
    gpt, llama = gpt_config(), llama_config()
    hf_models = {
        "gpt": (gpt, _gpt2_state_dict, transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=16, n_embd=64, n_layer=2, n_head=8, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, layer_norm_epsilon=gpt.norm_epsilon, bos_token_id=0, eos_token_id=0))),
        "llama": (llama, _llama_state_dict, transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=16, rms_norm_eps=llama.norm_epsilon,
            rope_theta=llama.rope_theta, tie_word_embeddings=False))),
    }
    for name, (config, convert, hf) in hf_models.items():
        ours = GPTModel(config, seed=5).eval()
        hf.load_state_dict(convert(ours.state_dict(), config), strict=True)
        hf.eval()
        with torch.no_grad():
            expected = hf(tokens).logits
            got = gather_logits(ours(tokens), ParallelState.single(), VOCAB)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _reference_rope(x, cos_half, sin_half):
    """Hugging Face's formula: x * cos + rotate_half(x) * sin with full-width cos/sin."""
    cos, sin = torch.cat((cos_half, cos_half), -1), torch.cat((sin_half, sin_half), -1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_split_qkv_rotary_equals_split_then_hugging_face_rope_forward_and_backward():
    from megatron.model.rotary import rotary_cos_sin, split_qkv_rotary

    b, s, nq, nkv, d = 2, 5, 4, 2, 6
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 0, 1]])
    cos, sin = (t.double() for t in rotary_cos_sin(positions, d, 500.0))
    qkv = torch.randn(b, s, (nq + 2 * nkv) * d, dtype=torch.float64, requires_grad=True)
    q, k, v = split_qkv_rotary(qkv, nq, nkv, d, (cos, sin))
    rq, rk, rv = qkv.split([nq * d, nkv * d, nkv * d], -1)
    torch.testing.assert_close(q, _reference_rope(rq.view(b, s, nq, d), cos, sin))
    torch.testing.assert_close(k, _reference_rope(rk.view(b, s, nkv, d), cos, sin))
    torch.testing.assert_close(v, rv.view(b, s, nkv, d))
    assert torch.autograd.gradcheck(lambda t: split_qkv_rotary(t, nq, nkv, d, (cos, sin)), (qkv,))


def test_swiglu_equals_silu_gate_times_up_forward_and_backward():
    from megatron.model.mlp import swiglu

    x = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(swiglu(x), torch.nn.functional.silu(gate) * up)
    assert torch.autograd.gradcheck(swiglu, (x,))


def test_cached_rotary_reuses_cos_sin_only_for_the_same_unchanged_position_ids():
    from megatron.model.rotary import cached_rotary

    positions = torch.arange(6).unsqueeze(0)
    first = cached_rotary(positions, 8, 10000.0)
    assert cached_rotary(positions, 8, 10000.0) is first
    assert cached_rotary(positions.clone(), 8, 10000.0) is not first
    assert cached_rotary(positions, 4, 10000.0)[0].shape[-1] == 2
    cached = cached_rotary(positions, 8, 10000.0)
    assert cached_rotary(positions, 8, 10000.0) is cached
    positions.add_(3)  # changed in place: the cached cos/sin are stale
    again = cached_rotary(positions, 8, 10000.0)
    assert again is not cached and not torch.equal(again[0], cached[0])


def test_gptmodel_computes_rope_cos_sin_once_per_forward(monkeypatch):
    import megatron.model.gpt_model as gpt_model
    from megatron.model import attention, rotary

    calls = []

    def counting(*args):
        calls.append(1)
        return rotary.rotary_cos_sin(*args)

    monkeypatch.setattr(gpt_model, "rotary_cos_sin", counting)
    monkeypatch.setattr(attention, "rotary_cos_sin", counting)
    model = GPTModel(llama_config())
    tokens, labels = batch()
    model(tokens, labels=labels).sum().backward()
    assert model.config.num_layers > 1 and len(calls) == 1
