"""Data: token corpora (.npy and Megatron indexed files), packing, blends, layout-independent sampling;
multimodal chat samples."""

from loom.data.packing import IGNORE_INDEX, PackedDataset, Sample
from loom.data.sampler import GlobalBatchSampler, Microbatch, collate, rank_microbatches
from loom.data.tokens import (TokenCorpus, check_vocab, index_path, load_token_file, synthetic_corpus,
                                write_token_file)
from loom.data.indexed import IndexedReader, IndexedWriter, best_dtype, indexed_exists, write_indexed
from loom.data.blend import (BlendedDataset, BlendedSampler, blend_pattern, build_text_dataset, load_corpus,
                               make_sampler)

# Multimodal chat data: tokenizer, chat template, images, sample packing.
from loom.data.chat import IMAGE_TAG, encode_chat
from loom.data.images import ImageProcessor, image_token_count, make_image_loader
from loom.data.multimodal import BAD_SAMPLE_REASONS, BadSampleError, MultimodalDataset, RejectedSample
from loom.data.multimodal_lazy import LazyMultimodalDataset
from loom.data.loader import StepBatches, StepLoader
from loom.data.multimodal_packing import PackingPlan, first_fit_decreasing, pack_samples
from loom.data.tokenizer import SpecialTokens, Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "BadSampleError",
    "RejectedSample",
    "GlobalBatchSampler",
    "Microbatch",
    "PackedDataset",
    "Sample",
    "TokenCorpus",
    "collate",
    "check_vocab",
    "index_path",
    "load_token_file",
    "rank_microbatches",
    "synthetic_corpus",
    "write_token_file",
    # indexed datasets and blends
    "BlendedDataset",
    "BlendedSampler",
    "IndexedReader",
    "IndexedWriter",
    "best_dtype",
    "blend_pattern",
    "build_text_dataset",
    "indexed_exists",
    "load_corpus",
    "make_sampler",
    "write_indexed",
    # multimodal
    "BAD_SAMPLE_REASONS",
    "IMAGE_TAG",
    "ImageProcessor",
    "LazyMultimodalDataset",
    "MultimodalDataset",
    "PackingPlan",
    "SpecialTokens",
    "StepBatches",
    "StepLoader",
    "Tokenizer",
    "encode_chat",
    "first_fit_decreasing",
    "image_token_count",
    "make_image_loader",
    "pack_samples",
]
