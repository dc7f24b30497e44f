"""The on-disk checkpoint contract shared by training and the converters (format.py).

A leaf package: it imports nothing from megatron.training or megatron.convert, so both can build on it.
"""

from megatron.checkpoint.format import (DEEPSPEED_LATEST_FILENAME, MANIFEST_FILENAME, TRACKER_FILENAME,
                                        TrainingProgress, checkpoint_tag, iteration_of_tag, list_checkpoint_tags,
                                        publish_directory, read_latest_tag, read_manifest, read_pointer,
                                        remove_stale_tmp, verify_manifest, write_manifest, write_pointers)
