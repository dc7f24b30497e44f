"""Conversion streams layer by layer: the anonymous memory it adds stays far below the model's size
(a converter that held the whole model, let alone twice, would need at least the model's size).

Peak anonymous memory (heap, not the memory-mapped checkpoint files) is sampled from
/proc/self/smaps_rollup in a thread while a ~220 MB model goes HF → ours (tp 2 × pp 2) → HF (16 MB
safetensors shards).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MEASURE = textwrap.dedent(r"""
    import json, sys, threading, time
    import torch
    sys.path.insert(0, sys.argv[1])
    from megatron.checkpoint.ds_checkpoint import DeepSpeedCheckpoint
    from megatron.convert.ds_writer import write_checkpoint
    from megatron.checkpoint.hf import HFModelSource
    from megatron.convert.hf_io import export_to_hf

    def anon_bytes():
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no Anonymous line")

    def peak_during(fn):
        base, peak, done = anon_bytes(), [0], threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], anon_bytes())
                time.sleep(0.001)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            done.set()
            thread.join()
        return max(peak[0], anon_bytes()) - base

    hf_dir, ours_dir, back_dir = sys.argv[2:5]
    torch.set_num_threads(1)
    import deepspeed, transformers, safetensors.torch  # noqa: E401,F401  (imports are not the converter's data)
    from transformers import AutoConfig
    AutoConfig.from_pretrained(hf_dir)
    if sys.argv[5] == "to_ours":
        added = peak_during(lambda: write_checkpoint(HFModelSource(hf_dir), ours_dir, 2, 2, progress=False))
    else:  # safetensors shards of 16 MB: the writer holds at most one shard besides the layer in hand
        added = peak_during(lambda: export_to_hf(DeepSpeedCheckpoint(ours_dir), back_dir, progress=False,
                                                 save_tokenizer_files=False, max_shard_bytes=16 * 2**20))
    print(json.dumps(added))
""")


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_conversion_adds_far_less_memory_than_the_model(tmp_path):
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest_layer = max(sum(p.numel() * p.element_size() for p in layer.parameters())
                        for layer in model.model.layers)
    model.save_pretrained(tmp_path / "hf")
    del model
    peaks = {}
    for direction in ("to_ours", "to_hf"):  # each in a fresh process: a heap freed once is not measured again
        proc = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT), str(tmp_path / "hf"),
                               str(tmp_path / "ours"), str(tmp_path / "back"), direction],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[direction] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"model {model_bytes / 1e6:.0f} MB, largest layer {largest_layer / 1e6:.0f} MB, added heap:",
          {k: f"{v / 1e6:.0f} MB" for k, v in peaks.items()})
    assert model_bytes > 200e6 and largest_layer < model_bytes / 16
    for direction, added in peaks.items():
        assert added < 0.5 * model_bytes, (
            f"{direction}: conversion added {added / 1e6:.0f} MB of heap for a {model_bytes / 1e6:.0f} MB model "
            f"(largest layer {largest_layer / 1e6:.0f} MB): it is not streaming layer by layer")
