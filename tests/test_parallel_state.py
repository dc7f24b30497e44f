"""Layout validation messages, Megatron's rank order, and real groups on 4 gloo ranks."""

import pytest

from megatron.config import ParallelConfig, TransformerConfig, validate_layout
from megatron.distributed.parallel_state import ParallelState
from multirank import run_ranks


def model(**kw):
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                ffn_hidden_size=128, seq_length=64)
    base.update(kw)
    return TransformerConfig(**base)


@pytest.mark.parametrize("world, parallel, model_kw, flags", [
    (6, dict(tensor_model_parallel_size=4), {}, ["world size 6", "--tensor-model-parallel-size 4"]),
    (8, dict(tensor_model_parallel_size=8), {}, ["--num-key-value-heads 4"]),
    (4, dict(tensor_model_parallel_size=4), dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64),
     ["--num-key-value-heads 2 is not divisible"]),
    (6, dict(tensor_model_parallel_size=3), dict(num_attention_heads=6, num_key_value_heads=6, hidden_size=60),
     ["--ffn-hidden-size 128"]),
    (4, dict(pipeline_model_parallel_size=4), dict(num_layers=6), ["--num-layers 6", "--pipeline-model-parallel-size 4"]),
    (4, dict(ds_sequence_parallel_size=4), dict(seq_length=66), ["--seq-length 66", "--ds-sequence-parallel-size 4"]),
    (2, dict(sequence_parallel=True), {}, ["--sequence-parallel needs --tensor-model-parallel-size > 1"]),
    (4, dict(pipeline_model_parallel_size=2, no_pipeline_parallel=True), {}, ["--no-pipeline-parallel"]),
])
def test_invalid_layouts_name_the_flags(world, parallel, model_kw, flags):
    with pytest.raises(ValueError) as err:
        validate_layout(world, ParallelConfig(**parallel), model(**model_kw))
    for flag in flags:
        assert flag in str(err.value)


def test_several_problems_are_reported_together():
    with pytest.raises(ValueError) as err:
        validate_layout(6, ParallelConfig(tensor_model_parallel_size=4, pipeline_model_parallel_size=3),
                        model(num_layers=4))
    text = str(err.value)
    assert "world size 6" in text and "--num-layers 4" in text


def test_rank_order_is_tp_then_dp_then_pp():
    ps = ParallelState(world_size=8, rank=0, tp_size=2, pp_size=2)
    assert sorted(ps.all_groups(("tp",))) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sorted(ps.all_groups(("dp",))) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(ps.all_groups(("pp",))) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert ps.coordinates(7).__dict__ == {"tp": 1, "sp": 0, "dp": 1, "pp": 1}


def test_ulysses_axis_sits_between_tp_and_dp():
    ps = ParallelState(world_size=8, rank=0, tp_size=2, sp_size=2)
    assert sorted(ps.all_groups(("sp",))) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(ps.all_groups(("dp",))) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert sorted(ps.all_groups(("sp", "dp"))) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def _groups_on_ranks(rank, world):
    import torch
    import torch.distributed as dist

    out = {}
    for name, cfg in (("tp2dp2", ParallelConfig(tensor_model_parallel_size=2)),
                      ("tp2pp2", ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
                      ("sp2dp2", ParallelConfig(ds_sequence_parallel_size=2))):
        ps = ParallelState.build(cfg, model())
        sums = {}
        for g in ("tp", "dp", "pp", "sp", "sdp"):
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=ps.groups[g])
            sums[g] = t.item()
        mpu = ps.mpu()
        out[name] = (sums, mpu.get_data_parallel_rank(), mpu.get_model_parallel_world_size(),
                     ps.group_ranks["embedding"])
    return out


def test_groups_communicate_over_the_right_ranks():
    results = run_ranks(4, _groups_on_ranks)
    r3 = results[3]
    # tp=2 × dp=2: rank 3 has tp peers {2,3}, dp peers {1,3}
    assert r3["tp2dp2"][0]["tp"] == 5 and r3["tp2dp2"][0]["dp"] == 4 and r3["tp2dp2"][0]["pp"] == 3
    assert r3["tp2dp2"][1] == 1
    # tp=2 × pp=2: rank 3 has pp peers {1,3}; model parallel is tp×pp = 4; embedding group = first+last stage
    assert r3["tp2pp2"][0]["pp"] == 4 and r3["tp2pp2"][2] == 4 and r3["tp2pp2"][3] == [1, 3]
    # Ulysses sp=2 × dp=2: rank 3 has sp peers {2,3}, dp peers {1,3}, sdp = all four
    assert r3["sp2dp2"][0]["sp"] == 5 and r3["sp2dp2"][0]["dp"] == 4 and r3["sp2dp2"][0]["sdp"] == 6
