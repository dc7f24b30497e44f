"""Checks that run before anything heavy is built (model, DeepSpeed engine, datasets), so that a bad input
fails in seconds with exit code 2 and one message naming it, instead of after minutes of start-up.

`preflight(run, world_size)` (pretrain_gpt.py, on every launch path, before any process group or engine exists)
runs every check that needs no process group and reports all problems together: the layout against the
launcher's world size and the model, the batch sizes and run length, the data lists, the tokenizer, the LR
schedule, and what the engine cannot run.

The data lists: every --data-path / --data-file-list / --<split>-data-path is parsed and each named
.bin/.idx pair must exist (megatron.data.data_list.blend_entries; the file headers are scanned later,
by build_datasets, which names a damaged file the same way).
"""

from __future__ import annotations

from megatron.data.data_list import SPLIT_NAMES, blend_entries


def check_data_lists(data_config) -> None:
    """Raise DataListError (naming the list, the line and the fix) for a malformed blend or a missing file."""
    if data_config.mock_data:
        return
    separate = {name: list(getattr(data_config, f"{name}_data_path", None) or []) for name in SPLIT_NAMES}
    if any(separate.values()):
        for name, path in separate.items():
            if path:
                blend_entries(path, flag=f"--{name}-data-path")
        return
    blend_entries(data_config.data_path, data_config.data_file_list)


def data_list_problems_of_argv(argv: list[str]) -> list[str]:
    """The data lists' problems on a command line whose other flags were refused (so no RunConfig exists): the
    data flags are read on their own, leniently, so that a flag error does not hide a missing data file."""
    import argparse

    from megatron.config.arguments import _normalize
    from megatron.config.data import DataConfig
    from megatron.errors import MegatronError

    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for name in ("--data-path", "--train-data-path", "--valid-data-path", "--test-data-path"):
        p.add_argument(name, nargs="*", default=[])
    p.add_argument("--data-file-list")
    p.add_argument("--mock-data", action="store_true")
    try:
        ns, _ = p.parse_known_args(_normalize(list(argv)))
    except (argparse.ArgumentError, SystemExit):  # a data flag itself is malformed: the refusal says so
        return []
    config = DataConfig(data_path=ns.data_path, data_file_list=ns.data_file_list, mock_data=ns.mock_data,
                        train_data_path=ns.train_data_path, valid_data_path=ns.valid_data_path,
                        test_data_path=ns.test_data_path)
    if not (config.data_path or config.data_file_list or any(getattr(config, f"{n}_data_path") for n in SPLIT_NAMES)):
        return []
    try:
        check_data_lists(config)
    except MegatronError as error:
        return [str(error)]
    except (OSError, ValueError):  # anything the full check reports better once the flags are fixed
        return []
    return []


def with_data_list_problems(refused, argv: list[str]):
    """`refused` (the flags' ConfigError), with the data lists' problems added when there are any."""
    from megatron.errors import ConfigError

    extra = data_list_problems_of_argv(argv)
    if not extra:
        return refused
    return ConfigError(f"{1 + len(extra)} problems; fix them all before relaunching:\n"
                       + "\n".join("* " + str(e).replace("\n", "\n  ") for e in [refused, *extra]))


def preflight_errors(run, world_size: int, device_type: str = "cpu") -> list[str]:
    """Every problem of `run` that can be found before any process group, engine or model exists, each a
    message naming the input and the fix; independent checks all run (a missing data file does not hide a
    batch-size error). The world size is the launcher's (1 under plain python)."""
    from megatron.config.arguments import validate_run
    from megatron.errors import MegatronError
    from megatron.optimizer.lr_schedule import check_lr_schedule
    import torch

    from megatron.training.engine import engine_config_errors

    errors: list[str] = []

    def collect(check):
        try:
            return check()
        except MegatronError as error:
            errors.append(str(error))
            return None

    layout_ok = collect(lambda: validate_run(run, world_size) or True)
    collect(lambda: check_data_lists(run.data))
    resolved = collect(lambda: resolve_vocab(run))
    if layout_ok:
        collect(lambda: check_lr_schedule(run, run.parallel.data_parallel_size(world_size)))
    if not run.checkpoint.load:  # a resume may take settings from the checkpoint: checked after its plan
        engine = engine_config_errors(resolved[0] if resolved else run, torch.device(device_type))
        errors += [e for e in engine if resolved or "vocabulary size is unknown" not in e]  # said above
    return errors


def preflight(run, world_size: int, device_type: str = "cpu") -> None:
    """Raise one ConfigError listing every problem `preflight_errors` finds (nothing when there is none)."""
    from megatron.errors import ConfigError

    errors = preflight_errors(run, world_size, device_type)
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} problems; fix them all before relaunching:\n"
                          + "\n".join("* " + e.replace("\n", "\n  ") for e in errors))


def resolve_vocab(run):
    """(run with model.vocab_size set, tokenizer) from --tokenizer-type, or NullTokenizer(--vocab-size)."""
    import dataclasses

    from megatron.data.tokenizers import NullTokenizer, build_tokenizer_from_config
    from megatron.errors import ConfigError

    if run.data.tokenizer_type:
        tokenizer = build_tokenizer_from_config(run.data)
    elif run.data.vocab_size:
        tokenizer = NullTokenizer(run.data.vocab_size)
    else:
        raise ConfigError("no vocabulary: give --tokenizer-type with its files (--tokenizer-model, or --vocab-file "
                          "and --merge-file), or --vocab-size (token ids are used as they are)")
    return dataclasses.replace(run, model=run.model.replace(vocab_size=tokenizer.vocab_size)), tokenizer

