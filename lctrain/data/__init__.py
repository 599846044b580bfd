"""Data: tokenizers, the embedded corpus, needle generators, MDS writing and the training loader.

Heavy imports (mosaicml-streaming) happen only when a loader or a dataset is built.
"""
from lctrain.data.loader import DataError, TrainLoader, build_train_loader, cp_slice  # noqa: F401
from lctrain.data.tokenizer import (  # noqa: F401
    ByteTokenizer,
    HFTokenizer,
    TokenizerError,
    check_model_vocab,
    check_vocab_size,
    get_tokenizer,
)
