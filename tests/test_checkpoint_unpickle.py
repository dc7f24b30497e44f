"""The restricted unpickler (megatron/checkpoint/unpickle.py): what upstream pickles loads without upstream
installed, anything else is refused by name before it is built."""

import argparse
import random
import sys
import types

import numpy as np
import pytest
import torch

from megatron.checkpoint import unpickle
from megatron.checkpoint.zero_shards import load_mmap

_BUILT = []


def _side_effect():
    _BUILT.append("ran")
    return "built"


class Payload:
    """Stands for any object whose unpickling runs code."""

    def __reduce__(self):
        return _side_effect, ()


def _upstream_enums(monkeypatch):
    """A module named like upstream's megatron.core.enums, so that torch.save pickles its ModelType by that name."""
    import enum

    module = types.ModuleType("megatron.core.enums")

    class ModelType(enum.Enum):
        encoder_or_decoder = 1
        encoder_and_decoder = 2

    ModelType.__module__, ModelType.__qualname__ = "megatron.core.enums", "ModelType"
    module.ModelType = ModelType
    monkeypatch.setitem(sys.modules, "megatron.core.enums", module)
    return ModelType


def test_upstream_client_state_loads_without_upstream(tmp_path, monkeypatch):
    theirs = _upstream_enums(monkeypatch)
    args = argparse.Namespace(model_type=theirs.encoder_or_decoder, params_dtype=torch.bfloat16, num_layers=2,
                              data_path=["1.0", "/x"])
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state()}
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"args": args, "checkpoint_version": 3.0, "rng_state": [rng], "module": {"w": torch.ones(2)}}, path)
    monkeypatch.delitem(sys.modules, "megatron.core.enums")  # upstream is not installed when we read it

    assert unpickle.unknown_globals(str(path)) == []
    state = load_mmap(str(path))
    got = state["args"]
    assert isinstance(got, argparse.Namespace)
    assert got.model_type is unpickle.ModelType.encoder_or_decoder
    assert got.params_dtype is torch.bfloat16 and got.data_path == ["1.0", "/x"]
    saved = state["rng_state"][0]
    assert saved["random_rng_state"] == rng["random_rng_state"]
    assert np.array_equal(saved["np_rng_state"][1], rng["np_rng_state"][1])
    assert torch.equal(saved["torch_rng_state"], rng["torch_rng_state"])
    assert torch.equal(state["module"]["w"], torch.ones(2))


def test_unknown_global_refused_by_name_and_not_built(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"args": {"x": Payload()}}, path)
    _BUILT.clear()
    assert unpickle.unknown_globals(str(path)) == [f"{__name__}._side_effect"]
    with pytest.raises(unpickle.UnknownPickleGlobal) as info:
        load_mmap(str(path))
    message = str(info.value)
    assert f"{__name__}._side_effect" in message and str(path) in message and "KNOWN_GLOBALS" in message
    assert _BUILT == []


def test_deepspeed_bookkeeping_is_known():
    """The DeepSpeed classes its ZeRO / bf16 optimizer files pickle resolve in this environment."""
    names = {name for _obj, name in unpickle.allowed_globals()}
    for name in ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
                 "deepspeed.runtime.fp16.loss_scaler.LossScaler", "argparse.Namespace",
                 "megatron.core.enums.ModelType"):
        assert name in names
