"""Instruction data: LLM-Adapters JSON/JSONL loading and validation, the Alpaca prompt, tokenisation
and a seeded, resumable batcher (padding, length grouping or packing).

The data flows ``load_records`` (``records``) -> ``tokenize_records`` (``tokenize``, with the prompt
of ``prompt``) -> ``Batcher`` (``batching``); ``build_loader`` does all three. ``builtin`` holds the
demo's arithmetic data and tokenizer. Everything here is plain Python + torch: a tokenizer is any
object with ``__call__`` (or ``encode``) returning token ids plus ``eos_token_id`` / ``pad_token_id``
(a Hugging Face tokenizer works). ``transformers`` is imported only inside ``builtin_tokenizer``.

Data files are never copied into the repository: a relative path that does not exist as given is
resolved against a data root taken from a config value or CLI flag, else the ``GRASS_DATA_DIR``
environment variable (see ``default_data_dir``). The installed package assumes no location.

Example::

    records = load_records(resolve_data_path("llm-adapters/ft-training_set/math_data.json"))
    loader = build_loader(records, tokenizer, max_length=256, batch_size=8, group_by_length=True)
    for batch in loader:  # one epoch; batch["input_ids"]: (B, T)
        ...
    state = loader.state_dict()  # {"epoch": ..., "index": ...}: resume exactly with load_state_dict
"""

from grass_llm.data.batching import BATCH_MODES, Batcher, build_loader
from grass_llm.data.builtin import (
    builtin_corpus,
    builtin_facts,
    builtin_heldout,
    builtin_sample,
    builtin_tokenizer,
)
from grass_llm.data.prompt import PROMPT_STYLES, RESPONSE_MARKER, format_prompt
from grass_llm.data.records import (
    DATA_DIR_ENV,
    TRAIN_FIELDS,
    DataError,
    default_data_dir,
    load_records,
    records_fingerprint,
    resolve_data_path,
)
from grass_llm.data.tokenize import tokenize_record, tokenize_records
from grass_llm.loss import IGNORE_INDEX

__all__ = [
    "BATCH_MODES",
    "DATA_DIR_ENV",
    "IGNORE_INDEX",
    "PROMPT_STYLES",
    "RESPONSE_MARKER",
    "TRAIN_FIELDS",
    "Batcher",
    "DataError",
    "build_loader",
    "builtin_corpus",
    "builtin_facts",
    "builtin_heldout",
    "builtin_sample",
    "builtin_tokenizer",
    "default_data_dir",
    "format_prompt",
    "load_records",
    "records_fingerprint",
    "resolve_data_path",
    "tokenize_record",
    "tokenize_records",
]
