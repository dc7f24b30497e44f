"""DeepSpeed config generation from flags, merging a user's file, precision checks, and DeepSpeed accepting it."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron.config.arguments import ConfigError, parse_args
from megatron.training.ds_config import build_deepspeed_config, precision_errors
from multirank import free_port, rank_env

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "64", "--mock-data",
        "--vocab-size", "1000", "--train-iters", "10"]


def test_generated_config_carries_batch_clipping_zero_and_fp16_loss_scaling():
    run = parse_args([*BASE, "--micro-batch-size", "2", "--global-batch-size", "16", "--clip-grad", "0.5",
                      "--zero-stage", "1", "--cpu-optimizer", "--fp16", "--initial-loss-scale", "4096"])
    cfg = build_deepspeed_config(run, dp_size=2, device_type="cuda")
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == \
        (16, 2, 4)
    assert cfg["gradient_clipping"] == 0.5 and cfg["steps_per_print"] >= 10**6 and not cfg["wall_clock_breakdown"]
    z = cfg["zero_optimization"]
    assert z["stage"] == 1 and z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert z["overlap_comm"] and z["contiguous_gradients"] and "offload_param" not in z
    assert cfg["fp16"]["enabled"] and cfg["fp16"]["loss_scale"] == 0 and cfg["fp16"]["initial_scale_power"] == 12
    assert "bf16" not in cfg and "optimizer" not in cfg and "scheduler" not in cfg
    fixed = parse_args([*BASE, "--fp16", "--loss-scale", "128"])
    assert build_deepspeed_config(fixed, dp_size=1)["fp16"]["loss_scale"] == 128


def test_zero3_parameter_offload_bf16_and_the_upstream_default_zero_stage():
    run = parse_args([*BASE, "--zero-stage", "3", "--cpu-optimizer", "--remote-device", "cpu", "--bf16"])
    cfg = build_deepspeed_config(run, dp_size=4, device_type="cpu")
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"] == {"device": "cpu", "pin_memory": False} and not z["overlap_comm"]
    assert cfg["bf16"] == {"enabled": True} and "data_types" not in cfg
    plain = build_deepspeed_config(parse_args(BASE), dp_size=1)
    assert plain["zero_optimization"]["stage"] == 1 and "activation_checkpointing" not in plain  # upstream: ZeRO-1
    assert "bf16" not in plain and "fp16" not in plain


def test_accumulate_allreduce_grads_in_fp32_sets_deepspeeds_grad_accum_dtype_or_is_refused():
    run = parse_args([*BASE, "--bf16", "--zero-stage", "1", "--accumulate-allreduce-grads-in-fp32"])
    assert build_deepspeed_config(run, dp_size=2)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert precision_errors(run, "cpu") == []
    assert "data_types" not in build_deepspeed_config(parse_args([*BASE, "--bf16", "--zero-stage", "1"]), dp_size=2)
    for stage in ("2", "3"):
        run = parse_args([*BASE, "--bf16", "--zero-stage", stage, "--accumulate-allreduce-grads-in-fp32"])
        assert any(f"needs --zero-stage 1 without --cpu-optimizer (got --zero-stage {stage})" in e
                   for e in precision_errors(run, "cpu"))
    # ZeRO-0 (upstream's AuroraGPT-2B recipe): DeepSpeed's BF16 optimizer, which older DeepSpeed ran without ZeRO
    # and this one selects as stage 1, said in a notice
    run = parse_args([*BASE, "--bf16", "--zero-stage", "0", "--accumulate-allreduce-grads-in-fp32"])
    assert run.training.zero.zero_stage == 1 and "BF16 optimizer" in run.notices[0]
    assert build_deepspeed_config(run, dp_size=2)["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = parse_args([*BASE, "--zero-stage", "0", "--accumulate-allreduce-grads-in-fp32"])  # already fp32
    assert precision_errors(fp32, "cpu") == [] and "data_types" not in build_deepspeed_config(fp32, dp_size=1)


def test_a_deepspeed_config_file_decides_the_accumulation_dtype_as_upstream(tmp_path):
    """Upstream's --accumulate-allreduce-grads-in-fp32 never reaches DeepSpeed: its config file decides, and a
    file without data_types.grad_accum_dtype gets DeepSpeed's default (the model's dtype). A flag the file
    overrides gets a one-line notice naming both; without a file, the flag decides."""
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
                                 "zero_optimization": {"stage": 1}}))
    run = parse_args([*BASE, "--bf16", "--accumulate-allreduce-grads-in-fp32", "--deepspeed_config", str(plain)])
    assert not run.training.precision.accumulate_allreduce_grads_in_fp32
    assert "data_types" not in build_deepspeed_config(run, dp_size=2)
    [notice] = [n for n in run.notices if "--accumulate-allreduce-grads-in-fp32" in n]
    assert str(plain) in notice and "has no data_types.grad_accum_dtype" in notice and "in bf16" in notice
    assert "\n" not in notice
    # the file's fp32 decides without the flag
    fp32 = tmp_path / "fp32.json"
    fp32.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
                                "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}))
    run = parse_args([*BASE, "--bf16", "--deepspeed_config", str(fp32)])
    assert run.training.precision.accumulate_allreduce_grads_in_fp32 and run.notices == []
    assert build_deepspeed_config(run, dp_size=2)["data_types"] == {"grad_accum_dtype": "fp32"}
    run = parse_args([*BASE, "--bf16", "--accumulate-allreduce-grads-in-fp32", "--deepspeed_config", str(fp32)])
    assert run.training.precision.accumulate_allreduce_grads_in_fp32 and run.notices == []
    # a file naming another dtype is named in the notice
    bf16 = tmp_path / "bf16.json"
    bf16.write_text(json.dumps({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "bf16"}}))
    run = parse_args([*BASE, "--bf16", "--accumulate-allreduce-grads-in-fp32", "--deepspeed_config", str(bf16)])
    assert not run.training.precision.accumulate_allreduce_grads_in_fp32
    assert "sets data_types.grad_accum_dtype = bf16" in run.notices[0]
    assert build_deepspeed_config(run, dp_size=2)["data_types"] == {"grad_accum_dtype": "bf16"}
    # upstream's Polaris recipe (fp16, the flag always, a file without data_types): a notice, not a refusal
    fp16 = tmp_path / "fp16.json"
    fp16.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    run = parse_args([*BASE, "--fp16", "--accumulate-allreduce-grads-in-fp32", "--deepspeed_config", str(fp16)])
    assert not run.training.precision.accumulate_allreduce_grads_in_fp32 and "in fp16" in run.notices[0]
    with pytest.raises(ConfigError, match="not --fp16"):  # without a file the flag decides, and fp16 cannot
        parse_args([*BASE, "--fp16", "--accumulate-allreduce-grads-in-fp32"])
    # upstream's AuroraGPT-2B (bf16, ZeRO-0, the flag, no data_types): ZeRO-0 with bf16 accumulation, as upstream
    zero0 = tmp_path / "zero0.json"
    zero0.write_text(json.dumps({"bf16": {"enabled": True}}))
    run = parse_args([*BASE, "--bf16", "--zero-stage", "0", "--accumulate-allreduce-grads-in-fp32",
                      "--deepspeed_config", str(zero0)])
    assert run.training.zero.zero_stage == 0 and not run.training.precision.accumulate_allreduce_grads_in_fp32


def test_user_file_is_merged_keeping_its_extra_sections(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4,
        "steps_per_print": 1, "zero_optimization": {"stage": 1, "reduce_bucket_size": 1000},
        "bfloat16": {"enabled": True, "loss_scale": 1.0}, "fp16": {"enabled": False},
        "flops_profiler": {"enabled": False}}))
    run = parse_args([*BASE, "--deepspeed_config", str(path), "--bf16", "--zero-stage", "1"])
    cfg = build_deepspeed_config(run, dp_size=2)
    assert cfg["steps_per_print"] == 1 and cfg["flops_profiler"] == {"enabled": False}
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000 and cfg["zero_optimization"]["stage"] == 1
    assert cfg["bf16"]["enabled"] and "bfloat16" not in cfg
    assert cfg["gradient_accumulation_steps"] == 4
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps = 2 .* but .*ds.json has 4"):
        build_deepspeed_config(run, dp_size=4)  # same file, but 4 data-parallel ranks: 8 / (1 × 4) = 2


def test_user_file_with_optimizer_section_or_disagreeing_values_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW"}}))
    run = parse_args([*BASE, "--deepspeed_config", str(path)])
    with pytest.raises(ConfigError, match=r"has a 'optimizer' section; .* --optimizer/--lr"):
        build_deepspeed_config(run, dp_size=1)
    # A RunConfig changed after parsing (as a tool might) is still checked against the file.
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    run = parse_args([*BASE, "--deepspeed_config", str(path)])
    run.training.zero.zero_stage = 1
    with pytest.raises(ConfigError, match=r"--zero-stage gives zero_optimization.stage = 1 but .*ds.json has 2"):
        build_deepspeed_config(run, dp_size=1)


def test_fp16_starts_at_upstreams_effective_loss_scale_unless_the_flag_says_otherwise():
    """Upstream's --initial-loss-scale (default 2**32) never reaches DeepSpeed: its fp16 runs start at DeepSpeed's
    default 2**16 (initial_scale_power 16). Decision: the flag is honoured when given; its default is 2**16."""
    cfg = build_deepspeed_config(parse_args([*BASE, "--fp16"]), dp_size=1)
    assert cfg["fp16"]["initial_scale_power"] == 16 and cfg["fp16"]["loss_scale"] == 0
    assert parse_args([*BASE, "--fp16"]).args["initial_loss_scale"] == 2.0**16  # saved as it ran
    cfg = build_deepspeed_config(parse_args([*BASE, "--fp16", "--initial-loss-scale", str(2**32)]), dp_size=1)
    assert cfg["fp16"]["initial_scale_power"] == 32
    # upstream's file (helpers.sh generateDSconfig, DTYPE=fp16) has no initial_scale_power: DeepSpeed starts at 2**16
    from deepspeed.runtime.precision_config import get_float16_config

    upstream = {"fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2,
                         "min_loss_scale": 1}}
    assert get_float16_config(upstream).initial_scale_power == 16


def test_precision_errors_refuse_fp16_on_cpu_only():
    fp16 = parse_args([*BASE, "--fp16"])
    assert any("--fp16 does not run on CPU" in e for e in precision_errors(fp16, "cpu"))
    assert precision_errors(fp16, "cuda") == []
    assert precision_errors(parse_args([*BASE, "--bf16"]), "cpu") == []


_DEEPSPEED_ACCEPTS = textwrap.dedent("""
    import os, sys, torch, deepspeed
    sys.path.insert(0, sys.argv[1])
    from megatron.config.arguments import parse_args
    from megatron.training.ds_config import build_deepspeed_config
    from megatron.optimizer.lr_schedule import build_lr_scheduler
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "8", "--mock-data",
            "--vocab-size", "100", "--train-iters", "4", "--lr", "0.1", "--lr-warmup-iters", "2",
            "--lr-decay-style", "linear", "--micro-batch-size", "2", "--global-batch-size", "4"]
    for extra in (["--zero-stage", "0"], ["--bf16", "--zero-stage", "2"], ["--zero-stage", "1", "--cpu-optimizer"],
                  ["--bf16", "--zero-stage", "1", "--accumulate-allreduce-grads-in-fp32"]):
        run = parse_args(base + extra)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        if run.training.zero.cpu_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            opt = DeepSpeedCPUAdam(model.parameters(), lr=run.training.optimizer.lr)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=run.training.optimizer.lr)
        engine, _, _, sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=build_lr_scheduler(opt, run),
            config=build_deepspeed_config(run, 1, "cpu"))
        dtype = torch.bfloat16 if run.training.precision.bf16 else torch.float32
        lrs = []
        for _ in range(2 * engine.gradient_accumulation_steps()):
            loss = engine(torch.ones(2, 8, dtype=dtype)).float().pow(2).mean()
            engine.backward(loss)
            before = engine.global_steps
            engine.step()
            if engine.global_steps != before:
                lrs.append(sched.get_last_lr()[0])
        assert engine.gradient_accumulation_steps() == 2, engine.gradient_accumulation_steps()
        assert sched.num_steps == 2 and abs(lrs[0] - 0.05) < 1e-9 and abs(lrs[1] - 0.1) < 1e-9, lrs
        # bf16 with fp32 gradient accumulation runs DeepSpeed's BF16 optimizer (fp32 grads), else ZeRO's (bf16)
        fp32_accumulation = type(engine.optimizer).__name__ == "BF16_Optimizer"
        assert fp32_accumulation == run.training.precision.accumulate_allreduce_grads_in_fp32, type(engine.optimizer)
    # why --accumulate-allreduce-grads-in-fp32 is refused at ZeRO-0: this DeepSpeed cannot run it (when one can,
    # this fails, and the refusal should give way to DeepSpeed's implementation)
    stage0 = dict(build_deepspeed_config(parse_args(base + ["--bf16", "--zero-stage", "1"]), 1, "cpu"),
                  zero_optimization={"stage": 0}, data_types={"grad_accum_dtype": "fp32"})
    model = torch.nn.Linear(8, 8)
    try:
        deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=stage0)
        raise SystemExit("DeepSpeed now accumulates bf16 gradients in fp32 at ZeRO-0")
    except NotImplementedError:
        pass
    print("ACCEPTED")
""")


def test_deepspeed_initialize_accepts_generated_configs_and_steps_the_schedule(tmp_path):
    script = tmp_path / "accepts.py"
    script.write_text(_DEEPSPEED_ACCEPTS)
    env = {**os.environ, **rank_env(0, 1, free_port()),
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".venv" / "torch_extensions")}
    out = subprocess.run([sys.executable, str(script), str(ROOT)], env=env, capture_output=True, text=True,
                         timeout=240)
    assert "ACCEPTED" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]

