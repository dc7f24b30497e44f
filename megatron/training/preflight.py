"""Checks that run before anything heavy is built (model, DeepSpeed engine, datasets), so that a bad input
fails in seconds with exit code 2 and one message naming it, instead of after minutes of start-up.

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
