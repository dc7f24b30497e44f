"""Shared helpers for the post-training tests: small hand-built SFT and DPO datasets in the micro-batch format of
megatron/data/post_training.py (the contract: SFT {"tokens" [b, s+1], "loss_mask" [b, s]}, DPO {"tokens" [2n, s+1]
chosen rows first, "loss_mask" [2n, s], "pair_ids" [n]}), and trainings inside spawned gloo ranks."""

from __future__ import annotations

import numpy as np
import torch

SEQ = 32
VOCAB = 128  # the model's tokens: NullTokenizer --vocab-size VOCAB - 1 (V + 1 tokens, as upstream)


class SyntheticSFT:
    """Prompt of random tokens, then a response that counts up from the prompt's first token (learnable);
    padded with token 0 (no loss) to SEQ + 1 tokens."""

    def __init__(self, examples: int = 64, seed: int = 0, seq: int = SEQ):
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(examples):
            prompt = rng.integers(3, 40, int(rng.integers(3, 9)))
            response = (prompt[0] + np.arange(1, int(rng.integers(4, 12)))) % 40 + 40
            tokens = np.zeros(seq + 1, dtype=np.int64)
            full = np.concatenate([prompt, response, [1]])[: seq + 1]  # 1: EOD, with loss
            tokens[: len(full)] = full
            mask = np.zeros(seq, dtype=np.float32)  # of the labels tokens[1:]
            mask[len(prompt) - 1: len(full) - 1] = 1.0
            self.items.append({"tokens": tokens, "loss_mask": mask})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class SyntheticPackedSFT:
    """SyntheticSFT's examples two to a row, with the packed keys of the contract: document_ids and position_ids
    restart per example (padding is one more document), and the label crossing into the next example has no loss."""

    def __init__(self, examples: int = 64, seed: int = 0, seq: int = SEQ):
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(examples):
            tokens = np.zeros(seq + 1, dtype=np.int64)
            mask = np.zeros(seq, dtype=np.float32)
            document_ids = np.zeros(seq, dtype=np.int64)
            position_ids = np.zeros(seq, dtype=np.int64)
            offset = 0
            for number in range(2):
                prompt = rng.integers(3, 40, int(rng.integers(3, 6)))
                response = (prompt[0] + np.arange(1, int(rng.integers(3, 7)))) % 40 + 40
                full = np.concatenate([prompt, response, [1]])
                tokens[offset:offset + len(full)] = full
                mask[offset + len(prompt) - 1: offset + len(full) - 1] = 1.0
                document_ids[offset:offset + len(full)] = number
                position_ids[offset:offset + len(full)] = np.arange(len(full))
                offset += len(full)
            document_ids[offset:] = 2
            position_ids[offset:] = np.arange(seq - offset)
            self.items.append({"tokens": tokens, "loss_mask": mask, "document_ids": document_ids,
                               "position_ids": position_ids})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_sft(items):
    return {key: torch.from_numpy(np.stack([it[key] for it in items])) for key in items[0]}


class SyntheticDPO:
    """Pair k: the same prompt; chosen = the counting response, rejected = a random one (both end in EOD)."""

    def __init__(self, examples: int = 64, seed: int = 0, seq: int = SEQ, first_id: int = 0):
        rng = np.random.default_rng(seed)
        self.items = []
        for k in range(examples):
            prompt = rng.integers(3, 40, int(rng.integers(3, 9)))
            n = int(rng.integers(4, 12))
            chosen = (prompt[0] + np.arange(1, n)) % 40 + 40
            rejected = rng.integers(80, 120, int(rng.integers(4, 12)))
            rows, masks = [], []
            for response in (chosen, rejected):
                full = np.concatenate([prompt, response, [1]])[: seq + 1]
                tokens = np.zeros(seq + 1, dtype=np.int64)
                tokens[: len(full)] = full
                mask = np.zeros(seq, dtype=np.float32)
                mask[len(prompt) - 1: len(full) - 1] = 1.0
                rows.append(tokens)
                masks.append(mask)
            self.items.append({"tokens": np.stack(rows), "loss_mask": np.stack(masks), "pair_id": first_id + k})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_dpo(items):
    tokens = [it["tokens"][0] for it in items] + [it["tokens"][1] for it in items]
    masks = [it["loss_mask"][0] for it in items] + [it["loss_mask"][1] for it in items]
    return {"tokens": torch.from_numpy(np.stack(tokens)), "loss_mask": torch.from_numpy(np.stack(masks)),
            "pair_ids": torch.tensor([it["pair_id"] for it in items], dtype=torch.int64)}


class ShortPairs:
    """Pairs short enough to pack three to a row (at most 10 tokens a sequence), in the item formats of
    megatron/data/post_training.py's DPODataset: padded, one pair an item; packed, consecutive pairs in row pairs of
    1, 3, 2, 2 pairs (8 pairs every 4 row pairs; each sequence its own document, positions restarting). Collate them
    with megatron/data/post_training.collate."""

    def __init__(self, examples: int = 32, seed: int = 0, seq: int = SEQ, packed: bool = False):
        rng = np.random.default_rng(seed)
        pairs = []
        for _ in range(examples):
            prompt = rng.integers(3, 40, int(rng.integers(2, 5)))
            chosen = (prompt[0] + np.arange(1, int(rng.integers(3, 6)))) % 40 + 40
            rejected = rng.integers(80, 120, int(rng.integers(2, 6)))
            pairs.append([(np.concatenate([prompt, response, [1]]), len(prompt)) for response in (chosen, rejected)])
        sizes = [(1, 3, 2, 2)[j % 4] for j in range(examples // 2)]
        starts = np.cumsum([0] + sizes)
        groups = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:]) if b <= examples] if packed \
            else [[k] for k in range(examples)]
        self.items = []
        for members in groups:
            item = {"pair_ids": np.array(members, dtype=np.int64)} if packed else {"pair_id": members[0]}
            for side, name in enumerate(("chosen", "rejected")):
                tokens, mask = np.zeros(seq + 1, dtype=np.int64), np.zeros(seq, dtype=np.float32)
                documents, positions = np.zeros(seq, dtype=np.int64), np.zeros(seq, dtype=np.int64)
                offset = 0
                for number, pair in enumerate(members):
                    full, prompt_length = pairs[pair][side]
                    tokens[offset:offset + len(full)] = full
                    mask[offset + prompt_length - 1:offset + len(full) - 1] = 1.0
                    documents[offset:offset + len(full)] = number
                    positions[offset:offset + len(full)] = np.arange(len(full))
                    offset += len(full)
                documents[offset:] = len(members)
                positions[offset:] = np.arange(seq - offset)
                item[name], item[f"{name}_loss_mask"] = tokens, mask
                if packed:
                    item[f"{name}_document_ids"], item[f"{name}_position_ids"] = documents, positions
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def packed_dpo_cases(rank: int, world_size: int, cases: list) -> dict:
    """(name, task flags, training flags) on ShortPairs, padded or packed as the task flags' --packing says."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from engine_cases import destroy_previous_case_groups, record_process_groups

    from megatron.cli import parse_args
    from megatron.config.post_training import split_post_training_args
    from megatron.data.post_training import collate
    from megatron.distributed.parallel_state import ParallelState
    from megatron.post_training.tasks import build_task
    from megatron.training.loop import train

    record_process_groups()
    out = {}
    for name, task_argv, argv in cases:
        destroy_previous_case_groups()
        config, _ = split_post_training_args(task_argv)
        task = build_task(config, (ShortPairs(packed=config.packing), None, None), collate)
        task.data_key_override = {"synthetic": "short pairs"}
        run = parse_args(argv)
        ps = ParallelState.build(run.parallel, run.model)
        result = train(run, ps, torch.device("cpu"), printer=lambda line: None, task=task)
        its = sorted(result.losses)
        out[name] = {"losses": [result.losses[i] for i in its], "metrics": [result.metrics.get(i, {}) for i in its],
                     "reference": task.reference.tolist()}
    return out


TINY_POST = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-key-value-heads", "2",
    "--ffn-hidden-size", "64", "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
    "--normalization", "rmsnorm", "--swiglu", "--position-embedding-type", "rope",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3",
    "--lr", "1e-2", "--lr-decay-style", "constant", "--clip-grad", "1.0", "--seed", "1234",
    "--mock-data", "--vocab-size", str(VOCAB - 1), "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0",
    "--zero-stage", "0",
]


def build_test_task(task_argv, examples=64, seed=0, valid=None):
    from megatron.config.post_training import split_post_training_args
    from megatron.post_training.tasks import build_task

    config, _ = split_post_training_args(task_argv)
    if config.task == "sft":
        data = SyntheticPackedSFT(examples, seed) if config.packing else SyntheticSFT(examples, seed)
        return build_task(config, (data, None, None), collate_sft)
    task = build_task(config, (SyntheticDPO(examples, seed), valid, None), collate_dpo)
    task.data_key_override = {"synthetic": f"dpo examples={examples} seed={seed}"}
    return task


def post_training_cases(rank: int, world_size: int, cases: list) -> dict:
    """Run each (name, task flags, training flags) in turn on these ranks; {name: summary} (rank-local)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from engine_cases import destroy_previous_case_groups, record_process_groups

    record_process_groups()
    out = {}
    for name, task_argv, argv in cases:
        destroy_previous_case_groups()
        out[name] = run_case(task_argv, argv)
    return out


def run_case(task_argv, argv, examples=64, lines=None):
    from megatron.cli import parse_args
    from megatron.distributed.parallel_state import ParallelState
    from megatron.training.loop import train

    run = parse_args(argv)
    ps = ParallelState.build(run.parallel, run.model)
    task = build_test_task(task_argv, examples)
    printed = [] if lines is None else lines
    result = train(run, ps, torch.device("cpu"), printer=printed.append, task=task)
    its = sorted(result.losses)
    return {"losses": [result.losses[i] for i in its], "metrics": [result.metrics.get(i, {}) for i in its],
            "grad_norms": [result.grad_norms[i] for i in its], "saved": list(result.saved),
            "start_iteration": result.start_iteration, "lines": printed,
            "reference": None if getattr(task, "reference", None) is None else task.reference.tolist()}


def guarded_cases(rank: int, world_size: int, cases: list) -> dict:
    """post_training_cases where a case may be refused: {name: summary} or {name: {"error": message}}; each
    case is (name, task flags, training flags, dataset examples)."""
    import deepspeed

    from megatron.errors import MegatronError

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    out = {}
    for name, task_argv, argv, examples in cases:
        try:
            out[name] = run_case(task_argv, argv, examples)
        except MegatronError as error:
            out[name] = {"error": str(error)}
    return out


def finetune_cases(rank: int, world_size: int, cases: list) -> dict:
    """finetune_gpt.py's path without its process handling: (name, argv) -> the run's losses, metrics and
    validation metrics, on preprocessed data."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from megatron.cli import parse_args
    from megatron.config.post_training import split_post_training_args
    from megatron.distributed.parallel_state import ParallelState
    from megatron.post_training.tasks import build_task
    from megatron.training.loop import train

    out = {}
    for name, argv in cases:
        config, rest = split_post_training_args(argv)
        run = parse_args(rest)
        ps = ParallelState.build(run.parallel, run.model)
        from engine_cases import RecordingTracker

        lines, tracker = [], RecordingTracker()
        result = train(run, ps, torch.device("cpu"), printer=lines.append, task=build_task(config), tracker=tracker)
        its = sorted(result.losses)
        out[name] = {"losses": [result.losses[i] for i in its], "metrics": [result.metrics.get(i, {}) for i in its],
                     "eval_metrics": dict(result.eval_metrics), "lines": lines, "scalars": tracker.scalars}
    return out


def loading_cases(rank: int, world_size: int, where: dict) -> dict:
    """finetune_gpt.py's --load of each kind of checkpoint, on one rank: an SFT run of ours (saved), that checkpoint
    as a DeepSpeed universal folder (megatron/convert/to_universal.py), and an argonne-lcf checkpoint
    (where["argonne"], its shape from --use-checkpoint-args); each loaded with --finetune by a DPO run, whose
    reference pass is the loaded model's log-probabilities. {name: run_case's summary}."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from megatron.convert.to_universal import convert_to_universal

    tmp = where["tmp"]
    dpo = lambda name: ["--task", "dpo", "--ref-logps-path", f"{tmp}/{name}.pt"]  # noqa: E731
    one_step = TINY_POST + ["--train-iters", "1"]
    out = {"sft": run_case(["--task", "sft"], TINY_POST + ["--train-iters", "2", "--save", f"{tmp}/ours",
                                                           "--save-interval", "100", "--zero-stage", "1"])}
    universal = convert_to_universal(f"{tmp}/ours")
    small = ["--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "1", "--lr", "1e-3",
             "--lr-decay-style", "constant", "--mock-data", "--num-workers", "0", "--log-interval", "1",
             "--eval-iters", "0", "--zero-stage", "0", "--hidden-dropout", "0", "--attention-dropout", "0",
             "--seed", "1234"]
    for name, argv in (("ours", one_step + ["--load", f"{tmp}/ours", "--finetune"]),
                       ("universal", one_step + ["--load", universal, "--universal-checkpoint", "--finetune"]),
                       ("scratch", one_step),
                       ("argonne", small + ["--use-checkpoint-args", "--load", where["argonne"], "--finetune",
                                             "--no-loss-over-padded-vocab"])):  # the softmax of its HF export
        out[name] = run_case(dpo(name), argv)
    # the inference engine (tools/run_text_generation_server.py, tools/evaluate.py) loads the same folders
    from megatron.inference.engine import InferenceEngine

    sequences = [[(7 * i + 3) % (VOCAB - 1) for i in range(SEQ)], [5, 9, 2, 11, 4]]
    tokenizer = {"tokenizer_type": "NullTokenizer", "vocab_size": VOCAB - 1}  # --mock-data records none
    out["engine"] = {kind: InferenceEngine.from_checkpoint(path, tokenizer_args=tokenizer, device="cpu")
                     .score(sequences) for kind, path in (("ours", f"{tmp}/ours"), ("universal", universal))}
    return out
