"""Data: MMIDIDX `.bin/.idx` token files, tokenizers, the GPT dataset and the blended index.

Levels, bottom up: indexed_dataset (one tokenized file) -> dataset (samples of one file) -> blend.
"""

from megatron.data.indexed_dataset import (
    DTYPE_CODES, IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, TokenFile, best_dtype, read_index_header,
    write_synthetic_dataset,
)
from megatron.data.tokenizers import build_tokenizer, build_tokenizer_from_config
# the blend, data lists and GPT datasets (numpy only; megatron.data.data_iterator needs torch, import it directly)
from megatron.data.blend import DEFAULT_WINDOW, BlendedIndex
from megatron.data.blend_report import BlendReport, blend_report, blend_report_for_config
from megatron.data.data_list import DataListError, blend_entries, parse_data_file_list, parse_data_path, parse_split
from megatron.data.gpt_dataset import GPTDataset, MockGPTDataset, build_datasets
from megatron.data.permutation import KeyedPermutation, permute
