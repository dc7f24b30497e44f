"""Every checkpoint: the on-disk format (format.py), the readers of each source (ours at any layout, DeepSpeed
universal, argonne-lcf/Megatron-DeepSpeed, Hugging Face), saving through DeepSpeed (deepspeed_io.py) and the one
owner of a resume (resume.py: locate, describe, plan, execute; `Checkpointer` is what the loop calls).

It sits below megatron.training and megatron.convert, which both build on it, and imports neither.
"""

from megatron.checkpoint.format import (DEEPSPEED_LATEST_FILENAME, MANIFEST_FILENAME, TRACKER_FILENAME,
                                        TrainingProgress, checkpoint_tag, iteration_of_tag, list_checkpoint_tags,
                                        publish_directory, read_latest_tag, read_manifest, read_pointer,
                                        remove_stale_tmp, verify_manifest, write_manifest, write_pointers)
