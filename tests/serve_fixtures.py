"""A tiny served model for the server and lm-eval tests: a byte-level BPE trained on stdlib text, a 2-layer
Llama-style GPTModel with that vocabulary, written as our checkpoint (tp 1) and exported to Hugging Face with
tools/convert_checkpoint.py to-hf.

    paths = build_tiny_served_model(tmp_dir)     # {"ckpt", "hf", "tokenizer"}
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_tiny_served_model(root: str, seq_length: int = 256, tp: int = 1, pp: int = 1) -> dict:
    import textwrap

    import torch

    from megatron.checkpoint.layout import StateDictSource
    from megatron.config.model import TransformerConfig
    from megatron.convert.ds_writer import write_checkpoint
    from megatron.model import GPTModel
    from tools.train_tokenizer import main as train_tokenizer

    corpus = os.path.join(root, "corpus.jsonl")
    with open(corpus, "w") as f:
        for module in (json, textwrap, inspect):
            f.write(json.dumps({"text": inspect.getsource(module)}) + "\n")
    bpe = os.path.join(root, "bpe")
    assert train_tokenizer(["--input", corpus, "--type", "bpe", "--vocab-size", "400", "--output-dir", bpe]) == 0
    vocab = len(json.load(open(os.path.join(bpe, "vocab.json"))))
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               seq_length=seq_length, max_position_embeddings=seq_length, vocab_size=vocab,
                               make_vocab_size_divisible_by=64, attention_dropout=0.0, hidden_dropout=0.0,
                               normalization="rmsnorm", swiglu=True, position_embedding_type="rope",
                               untie_embeddings_and_output_weights=True, ffn_hidden_size=128,
                               add_bias_linear=False, init_method_std=0.5)
    torch.manual_seed(0)
    model = GPTModel(config, seed=11)
    tokenizer_args = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": os.path.join(bpe, "vocab.json"),
                      "merge_file": os.path.join(bpe, "merges.txt")}
    ckpt = os.path.join(root, "ckpt")
    write_checkpoint(StateDictSource(model.state_dict(), config, tokenizer_args=tokenizer_args), ckpt, tp=tp, pp=pp,
                     progress=False)
    hf = os.path.join(root, "hf")
    from tools.convert_checkpoint import main as convert_checkpoint

    assert convert_checkpoint(["to-hf", "--load", ckpt, "--out", hf]) == 0
    return {"ckpt": ckpt, "hf": hf, "tokenizer": bpe}


def start_server(load: str, ranks: int = 1, extra: tuple = (), log_dir: str | None = None):
    """tools/run_text_generation_server.py on `ranks` processes launched as torchrun would (RANK, WORLD_SIZE,
    MASTER_* in the environment); returns (base_url, processes) once GET /health answers."""
    from tests.multirank import free_port, rank_env

    port, master = free_port(), free_port()
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, PYTHONPATH=ROOT, **(rank_env(rank, ranks, master) if ranks > 1 else {}))
        log = open(os.path.join(log_dir, f"server_rank{rank}.log"), "w") if log_dir else subprocess.DEVNULL
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "run_text_generation_server.py"),
                                       "--load", load, "--port", str(port), "--no-request-log", *extra],
                                      stdout=log, stderr=subprocess.STDOUT, env=env))
    url = f"http://127.0.0.1:{port}"
    try:
        for p in procs:
            wait_for_health(url, p, log_dir)
    except RuntimeError:
        stop_server(procs)
        raise
    return url, procs


def wait_for_health(url: str, proc, log: str | None = None, timeout: float = 300) -> None:
    """Return once GET /health answers 200; RuntimeError when `proc` exits first or it never does (a loaded
    2-core machine starts slowly: this is a wait, not a measurement)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited early (code {proc.poll()}); see {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /health; see {log}")


def stop_server(procs, timeout: float = 120) -> list:
    """SIGTERM every rank (as torchrun forwards it), wait; the exit codes."""
    import signal

    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def serve_in_thread(engine, max_batch_size: int = 8):
    """The server's FastAPI app on `engine` in this process (uvicorn in a thread, real HTTP on a free port);
    returns (base_url, stop)."""
    import threading
    import time

    import uvicorn

    from megatron.inference.server import Scheduler, ServerSettings, build_app
    from tests.multirank import free_port

    port = free_port()
    scheduler = Scheduler(engine, max_batch_size)
    app = build_app(engine, scheduler, ServerSettings(port=port, log_requests=False))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=120)
        scheduler.stop()

    return f"http://127.0.0.1:{port}", stop
