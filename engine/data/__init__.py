"""Text data pipeline: token corpora, packing into fixed windows, layout-independent sampling."""

from engine.data.packing import IGNORE_INDEX, PackedDataset, Sample
from engine.data.sampler import GlobalBatchSampler, Microbatch, collate, rank_microbatches
from engine.data.tokens import TokenCorpus, index_path, load_token_file, synthetic_corpus, write_token_file

__all__ = [
    "IGNORE_INDEX",
    "GlobalBatchSampler",
    "Microbatch",
    "PackedDataset",
    "Sample",
    "TokenCorpus",
    "collate",
    "index_path",
    "load_token_file",
    "rank_microbatches",
    "synthetic_corpus",
    "write_token_file",
]
