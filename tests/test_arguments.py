"""The Megatron-DeepSpeed command line: flag mapping, presets, errors that name the flag, derived batch values."""

import json

import pytest

from megatron.config.arguments import (
    ConfigError, global_batch_size_at, gradient_accumulation_steps, parse_args, stops_at_train_tokens, train_iters,
    train_samples, validate_run,
)

BASE = ["--mock-data", "--vocab-size", "1000", "--train-iters", "10"]
LLAMA = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "64"]


def test_alcf_recipe_flags_map_onto_the_dataclasses():
    # The shape of ALCF/helpers.sh's argument list (llama flags, '=' forms, no-op fusion flags, underscores).
    argv = [
        "--swiglu", "--hidden-dropout", "0", "--attention-dropout", "0", "--normalization", "rmsnorm",
        "--disable-bias-linear", "--no-query-key-layer-scaling", "--use-rotary-position-embeddings",
        "--untie-embeddings-and-output-weights", "--num-key-value-heads", "2", "--ffn-hidden-size", "176",
        "--lr", "0.0002", "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.05",
        "--use-checkpoint-opt_param-scheduler", "--use-flash-attn-builder", "--deepspeed", "--no-pipeline-parallel",
        "--zero-stage=1", "--bf16", "--shuffle-sample-in-corpus", "--blend-sample-in-corpus",
        "--accumulate-allreduce-grads-in-fp32", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
        "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion", "--optimizer=adamw",
        "--tensor-model-parallel-size=2", "--pipeline-model-parallel-size=1", "--max-position-embeddings=128",
        "--micro-batch-size=2", "--ds-sequence-parallel-size=1", "--global-batch-size=16", "--split=990,10,0",
        "--timing-log-level=1", "--eval-interval=100", "--eval-iters=20", "--save-interval=50",
        "--log-interval=1", "--save=/tmp/ckpt", "--load=/tmp/ckpt", "--seq-length=128", "--num-layers=2",
        "--hidden-size=64", "--train-iters=100", "--distributed-backend=gloo", "--weight-decay=0.1",
        "--adam-beta1=0.9", "--adam-beta2=0.95", "--adam-eps=0.00001", "--clip-grad=1.0",
        "--num-attention-heads=8", "--data-cache-path=/tmp/cache", "--data-file-list=/tmp/list.txt",
        "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "/tmp/tok.model", "--local_rank=0",
        "--log-timers-to-tensorboard", "--tensorboard-dir", "/tmp/tb", "--rope-theta", "500000",
    ]
    run = parse_args(argv)
    m = run.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.ffn_hidden_size) == \
        (2, 64, 8, 2, 176)
    assert m.swiglu and m.normalization == "rmsnorm" and not m.add_bias_linear
    assert m.position_embedding_type == "rope" and m.untie_embeddings_and_output_weights and m.rope_theta == 5e5
    assert (m.seq_length, m.max_position_embeddings, m.hidden_dropout) == (128, 128, 0.0)
    assert run.parallel.tp == 2 and run.parallel.no_pipeline_parallel and run.parallel.distributed_backend == "gloo"
    t = run.training
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters) == (2, 16, 100)
    assert t.optimizer.optimizer == "adamw" and t.optimizer.adam_beta2 == 0.95 and t.optimizer.lr_warmup_fraction == 0.05
    assert t.precision.bf16 and not t.precision.fp16 and t.zero.zero_stage == 1
    assert run.data.data_file_list == "/tmp/list.txt" and run.data.split == "990,10,0"
    assert run.data.tokenizer_type == "Llama2Tokenizer"
    assert run.checkpoint.save == "/tmp/ckpt" and run.checkpoint.save_interval == 50
    assert run.logging.tensorboard_dir == "/tmp/tb" and run.logging.log_timers_to_tensorboard
    assert run.args["num_layers"] == 2 and run.args["rope_theta"] == 5e5 and run.args["zero_stage"] == 1
    json.dumps(run.args)  # the run's arguments are saved with checkpoints


def test_preset_fills_model_flags_and_explicit_flags_win():
    run = parse_args(["--model-preset", "llama2-7b", "--num-layers", "3", "--seq-length", "256", *BASE])
    assert run.model.num_layers == 3 and run.model.hidden_size == 4096 and run.model.ffn_hidden_size == 11008
    assert run.model.seq_length == 256 and run.model.swiglu and run.model.position_embedding_type == "rope"
    assert run.args["hidden_size"] == 4096  # final values, not the None the flag defaulted to


def test_swiglu_without_ffn_size_uses_megatron_deepspeed_rule_and_aliases_work():
    run = parse_args([*LLAMA, "--swiglu", "--layernorm-epsilon", "1e-6", "--no-position-embedding", *BASE])
    assert run.model.ffn_hidden_size == int(8 * 64 / 3 / 64) * 64 == 128
    assert run.model.norm_epsilon == 1e-6 and run.model.position_embedding_type == "none"
    run = parse_args([*LLAMA, "--norm_epsilon", "1e-6", *BASE])  # underscore spelling of --norm-epsilon
    assert run.model.norm_epsilon == 1e-6


def test_unknown_flag_suggests_the_nearest_known_one():
    with pytest.raises(ConfigError, match=r"unknown flag --num-layer; did you mean --num-layers\?") as e:
        parse_args(["--num-layer", "2", *LLAMA, *BASE])
    assert "unexpected value" not in str(e.value)  # the unknown flag's value is not reported separately
    with pytest.raises(ConfigError, match="did you mean --micro-batch-size"):
        parse_args([*LLAMA, *BASE, "--micro_batch_sise=2"])
    with pytest.raises(ConfigError, match=r"--cpu-offload; did you mean --cpu-optimizer .* --remote-device cpu"):
        parse_args([*LLAMA, *BASE, "--cpu-offload"])


@pytest.mark.parametrize("argv, message", [
    (["--lr", "abc"], r"--lr: invalid float value: 'abc'"),
    (["--micro-batch-size", "0"], r"--micro-batch-size: must be > 0"),
    (["--bf16", "--fp16"], r"--bf16 and --fp16 both given"),
    (["--min-lr", "1", "--lr", "0.1"], r"--min-lr \(1.0\) <= --lr \(0.1\)"),
    (["--train-samples", "5"], r"give only one of --train-iters, --train-samples"),
    (["--lr-warmup-iters", "3", "--lr-warmup-fraction", "0.1"], r"only one of --lr-warmup-fraction"),
    (["--cpu-optimizer", "--zero-stage", "0"], r"--cpu-optimizer .* needs --zero-stage >= 1"),
    (["--zero-stage", "3", "--pipeline-model-parallel-size", "2"], r"--zero-stage 3 does not work with"),
    (["--use-mics"], r"--use-mics: MiCS sharding is not supported"),
    (["--save", "/tmp/x"], r"--save needs --save-interval"),
    (["--normalization", "batchnorm"], r"--normalization: invalid choice"),
    (["--num-attention-heads", "6"], r"--hidden-size 64 is not divisible by --num-attention-heads 6"),
    (["--initial-loss-scale", "1000"], r"--initial-loss-scale 1000.0 must be a power of 2"),
])
def test_invalid_values_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args([*LLAMA, *BASE, *argv])


def test_missing_model_size_and_mock_data_without_vocab_are_explained():
    with pytest.raises(ConfigError, match=r"--num-layers, --hidden-size, --num-attention-heads, --seq-length required"):
        parse_args(BASE)
    with pytest.raises(ConfigError, match=r"^--seq-length required \(or give --model-preset NAME\)"):  # no default
        parse_args([*LLAMA[:-2], *BASE])
    with pytest.raises(ConfigError, match=r"--mock-data needs --vocab-size"):
        parse_args([*LLAMA, "--mock-data", "--train-iters", "1"])


def test_deepspeed_file_fills_missing_flags_and_disagreement_names_both_sides(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                                "zero_optimization": {"stage": 2}, "bfloat16": {"enabled": True},
                                "gradient_clipping": 0.5}))
    run = parse_args([*LLAMA, *BASE, "--deepspeed_config", str(path)])
    t = run.training
    assert (t.global_batch_size, t.micro_batch_size, t.zero.zero_stage, t.optimizer.clip_grad) == (32, 4, 2, 0.5)
    assert t.precision.bf16 and run.parallel.no_pipeline_parallel  # ZeRO-2 runs without the pipeline engine
    with pytest.raises(ConfigError, match=r"--zero-stage 1 disagrees with .*ds.json: zero_optimization.stage = 2"):
        parse_args([*LLAMA, *BASE, "--deepspeed_config", str(path), "--zero-stage", "1"])
    with pytest.raises(ConfigError, match=r"--deepspeed_config .*missing.json: file not found"):
        parse_args([*LLAMA, *BASE, "--deepspeed_config", str(tmp_path / "missing.json")])
    (tmp_path / "bad.json").write_text("{\n 'a': 1}")
    with pytest.raises(ConfigError, match=r"not valid JSON \(line 2"):
        parse_args([*LLAMA, *BASE, "--deepspeed_config", str(tmp_path / "bad.json")])


def test_gradient_accumulation_and_its_mismatch_error():
    run = parse_args([*LLAMA, *BASE, "--micro-batch-size", "2", "--global-batch-size", "24"])
    assert gradient_accumulation_steps(run, dp_size=3) == 4
    with pytest.raises(ConfigError, match=r"--global-batch-size 24 .* --micro-batch-size 2 × data-parallel size 5"):
        gradient_accumulation_steps(run, dp_size=5)
    assert gradient_accumulation_steps(parse_args([*LLAMA, *BASE]), dp_size=4) == 1  # default global = micro × dp


def test_train_iters_from_iters_samples_and_tokens():
    common = [*LLAMA, "--mock-data", "--vocab-size", "100", "--seq-length", "32", "--global-batch-size", "8"]
    assert train_iters(parse_args([*common, "--train-iters", "7"]), 2) == 7
    assert train_iters(parse_args([*common, "--train-samples", "80"]), 2) == 10
    # Not a multiple of the global batch: whole batches only (Megatron rounds down), so the data never runs out.
    assert train_iters(parse_args([*common, "--train-samples", "87"]), 2) == 10
    with pytest.raises(ConfigError, match=r"--train-samples gives 7 samples, fewer than one global batch \(8\)"):
        train_iters(parse_args([*common, "--train-samples", "7"]), 2)
    # --train-tokens is upstream's token budget, not the run length: it goes with --train-iters/--train-samples
    run = parse_args([*common, "--train-samples", "80", "--train-tokens", str(32 * 8 * 5)])
    assert train_samples(run, 2) == 80 and train_iters(run, 2) == 10
    assert not stops_at_train_tokens(run, 32) and stops_at_train_tokens(run, 40)
    with pytest.raises(ConfigError, match=r"--train-tokens is a token budget.*give --train-iters or --train-samples"):
        parse_args([*common, "--train-tokens", str(32 * 87)])


def test_rampup_batch_size_follows_megatron_semantics():
    # start 4, increment 4, over 96 samples up to 16: 3 increments, one every 32 samples.
    run = parse_args([*LLAMA, "--mock-data", "--vocab-size", "100", "--global-batch-size", "16",
                      "--rampup-batch-size", "4", "4", "96", "--train-samples", "200"])
    assert [global_batch_size_at(run, c, dp_size=2) for c in (0, 31, 32, 64, 95, 96, 500)] == \
        [4, 4, 8, 12, 12, 16, 16]
    # walk: 4×8 = 32 samples (8 iters), 8×4 = 32 (4 iters), 12×3 = 36 → 100 (3 iters), then 100 // 16 → 6 iters.
    assert train_iters(run, dp_size=2) == 8 + 4 + 3 + 6
    with pytest.raises(ConfigError, match=r"--rampup-batch-size needs --train-samples, not --train-iters"):
        parse_args([*LLAMA, *BASE, "--global-batch-size", "16", "--rampup-batch-size", "4", "4", "96"])


def test_validate_run_reports_layout_batch_and_data_problems_together():
    run = parse_args([*LLAMA, "--train-iters", "5", "--tensor-model-parallel-size", "3", "--vocab-size", "9",
                      "--global-batch-size", "3"])
    with pytest.raises(ConfigError) as e:
        validate_run(run, world_size=4)
    text = str(e.value)
    assert "world size 4 is not divisible by --tensor-model-parallel-size 3" in text
    assert "no training data: give --data-path" in text
    run = parse_args([*LLAMA, *BASE, "--tensor-model-parallel-size", "2", "--global-batch-size", "3"])
    with pytest.raises(ConfigError, match=r"--global-batch-size 3 is not divisible"):
        validate_run(run, world_size=4)
    validate_run(parse_args([*LLAMA, *BASE, "--tensor-model-parallel-size", "2"]), world_size=4)
