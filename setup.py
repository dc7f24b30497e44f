"""Installs the `megatron` package. Use tools/setup_env.sh for a ready environment: it installs
torch first (the CPU build where there is no GPU) and pins it with `pip -c constraints.txt`
for everything after, so DeepSpeed never pulls a different torch."""

from setuptools import find_packages, setup

setup(
    name="megatron-ds-lite",
    version="0.1.0",
    description="Megatron-DeepSpeed-style pretraining of GPT and Llama-style models: TP/PP/SP/Ulysses, ZeRO, "
                "blended Megatron datasets, checkpoint converters",
    packages=find_packages(include=["megatron", "megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",  # tested: 0.19.8 (constraints.txt, megatron/deepspeed_compat.py)
        "numpy",
        "mpi4py",
        "sentencepiece",
        "tokenizers",
        "transformers",
        "safetensors",
        "tqdm",
        # --optimizer choices run by well-kept libraries (megatron/optimizer/__init__.py says which)
        "schedulefree",
        "pytorch-optimizer",
        "galore-torch",
    ],
    extras_require={
        # The suite also checks against the field's references: TRL (DPO/SFT), lm-evaluation-harness, the openai client.
        "test": ["pytest", "pytest-timeout", "trl", "lm-eval[api]>=0.4,<0.5", "openai", "httpx"],
        # tools/run_text_generation_server.py: FastAPI on uvicorn (megatron/inference/server.py says why)
        "serve": ["fastapi", "uvicorn"],
        # tools/evaluate.py: lm-evaluation-harness in-process on our checkpoints
        "eval": ["lm-eval>=0.4,<0.5"],
        # benchmarks/bench_optimizers.py draws its loss curves with matplotlib, bench_long_sequence.py its memory plot
        "bench": ["matplotlib"],
        "tracking": ["wandb", "tensorboard"],
        # An MPI launcher inside the virtual environment (laptops, CI); clusters use their own MPI.
        "local-mpi": ["mpich"],
        # Intel GPUs: torch >= 2.8 has native XPU and the xccl backend; these are optional extras.
        "xpu": ["intel-extension-for-pytorch", "oneccl-bindings-for-pytorch"],
    },
)
