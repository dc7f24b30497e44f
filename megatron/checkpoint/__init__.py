"""The on-disk checkpoint contract shared by training and the converters (format.py).

A leaf package: it imports nothing from megatron.training or megatron.convert, so both can build on it.
"""

from megatron.checkpoint.format import (DEEPSPEED_LATEST_FILENAME, MANIFEST_FILENAME, TMP_PREFIX, TRACKER_FILENAME,
                                        CheckpointError, TrainingProgress, atomic_output, checkpoint_tag,
                                        fsync_dir, fsync_tree, iteration_of_tag, list_checkpoint_tags,
                                        publish_directory, read_latest_tag, read_manifest, read_pointer,
                                        remove_stale_tmp, replace_atomically, torch_save_atomically,
                                        verify_manifest, write_bytes_atomically, write_manifest, write_pointers,
                                        write_text_atomically)
