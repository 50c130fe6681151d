"""Seeded, resumable batching of tokenised examples (padding, length grouping or packing), and
``build_loader``: records -> examples -> a ``Batcher``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from grass_llm.data.records import DataError
from grass_llm.data.tokenize import tokenize_records
from grass_llm.loss import IGNORE_INDEX

__all__ = ["BATCH_MODES", "Batcher", "build_loader"]

#: Batching modes of ``Batcher``.
BATCH_MODES = ("shuffle", "group_by_length", "packing")


class Batcher:
    """Seeded, resumable batches of tokenised examples; iterating gives the rest of the current epoch.

    Modes:
        ``shuffle``: a random permutation per epoch, cut into batches, each right-padded.
        ``group_by_length``: the permutation is cut into mega-batches of ``mega_batch * batch_size``
            examples, each sorted by length (longest first) and cut into batches, so a batch holds
            similar lengths (little padding); the batch with the longest example goes first, so an
            out-of-memory error shows at step 1 (as Hugging Face's length-grouped sampler does).
        ``packing``: the permuted examples are concatenated (each ends in EOS) and cut into rows of
            ``block_size`` tokens; the last partial row is dropped. No padding; attention crosses
            example boundaries inside a row (plain packing, no per-document masks).

    Batches are dicts of ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, T)`` int64;
    padding is on the right with ``pad_token_id`` (mask 0, label ``IGNORE_INDEX``).

    The order of an epoch depends only on ``(seed, epoch)``, so ``state_dict()`` -> ``{"epoch",
    "index"}`` (``index`` = batches of that epoch already handed out) is all that resuming needs.
    A batch counts as handed out when it is yielded; after the last batch of an epoch the state is
    already ``(epoch + 1, 0)``.
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Sequence[int]]],
        batch_size: int,
        pad_token_id: int,
        mode: str = "shuffle",
        seed: int = 0,
        block_size: int | None = None,
        mega_batch: int = 50,
        drop_last: bool = False,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if mode not in BATCH_MODES:
            raise ValueError(f"batch mode {mode!r} is unknown; allowed: {', '.join(BATCH_MODES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mega_batch < 1:
            raise ValueError(f"mega_batch must be >= 1, got {mega_batch}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token (e.g. its EOS)")
        if not examples:
            raise DataError("no examples to batch")
        for i, ex in enumerate(examples, 1):
            if len(ex["input_ids"]) != len(ex["labels"]) or not ex["input_ids"]:
                raise DataError(f"example {i}: input_ids and labels must be non-empty and of equal length")
        self.examples = [(list(ex["input_ids"]), list(ex["labels"])) for ex in examples]
        self.batch_size = batch_size
        self.pad_token_id = int(pad_token_id)
        self.mode = mode
        self.seed = int(seed)
        self.mega_batch = mega_batch
        self.drop_last = drop_last
        self.pad_to_multiple_of = pad_to_multiple_of
        self.block_size = block_size
        if mode == "packing":
            if block_size is None or block_size < 2:
                raise ValueError(f"packing needs block_size >= 2, got {block_size}")
            total = sum(len(ids) for ids, _ in self.examples)
            if total < block_size:
                raise DataError(
                    f"packing: the data has {total} tokens, fewer than one block of block_size={block_size}"
                )
            self._num_rows = total // block_size
        else:
            self._num_rows = len(self.examples)
        self.epoch = 0
        self.index = 0
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    # -- plan ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self._num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(len(self.examples), generator=g).tolist()

    def _plan(self, epoch: int) -> list[list[int]]:
        """Row ids of each batch of ``epoch`` (example ids, or packed-block ids)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        bs = self.batch_size
        if self.mode == "packing":
            rows = list(range(self._num_rows))
        else:
            rows = self._permutation(epoch)
        if self.mode == "group_by_length":
            size = self.mega_batch * bs
            lengths = [len(ids) for ids, _ in self.examples]
            sorted_rows: list[int] = []
            for start in range(0, len(rows), size):
                mega = rows[start : start + size]
                sorted_rows += sorted(mega, key=lambda i: -lengths[i])  # stable: ties keep random order
            rows = sorted_rows
        batches = [rows[i : i + bs] for i in range(0, len(rows), bs)]
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        if self.mode == "group_by_length" and batches:
            lengths = [len(ids) for ids, _ in self.examples]
            longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
            batches[0], batches[longest] = batches[longest], batches[0]
        self._plan_cache = (epoch, batches)
        return batches

    def _packed_stream(self, epoch: int) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for i in self._permutation(epoch):
            ids += self.examples[i][0]
            labels += self.examples[i][1]
        return ids, labels

    # -- collate -----------------------------------------------------------------------------------
    def collate(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, torch.Tensor]:
        """Right-pad ``(input_ids, labels)`` rows into a batch dict of ``(B, T)`` tensors."""
        width = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for r, (ids, labs) in enumerate(rows):
            k = len(ids)
            input_ids[r, :k] = torch.tensor(ids, dtype=torch.long)
            labels[r, :k] = torch.tensor(labs, dtype=torch.long)
            attention_mask[r, :k] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The remaining batches of the current epoch; the state advances as batches are yielded."""
        epoch = self.epoch
        plan = self._plan(epoch)
        stream = self._packed_stream(epoch) if self.mode == "packing" else None
        block = self.block_size or 0
        while self.epoch == epoch and self.index < len(plan):
            rows = plan[self.index]
            if stream is not None:
                batch_rows = [
                    (stream[0][b * block : (b + 1) * block], stream[1][b * block : (b + 1) * block])
                    for b in rows
                ]
            else:
                batch_rows = [self.examples[i] for i in rows]
            self.index += 1
            if self.index >= len(plan):
                self.epoch, self.index = epoch + 1, 0
            yield self.collate(batch_rows)

    def forever(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches without end, epoch after epoch (resumable like ``__iter__``)."""
        while True:
            yield from self

    # -- state -----------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": len(self.examples),
            "num_batches": len(self),
        }

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "index"}`` plus the settings the order depends on (checked on load)."""
        return {"epoch": self.epoch, "index": self.index, **self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` was taken. Raises ``ValueError`` if the data or settings differ."""
        mine = self._fingerprint()
        diff = {k: (state[k], v) for k, v in mine.items() if k in state and state[k] != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"batcher state does not match this data/batching ({detail})")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self):
            raise ValueError(f"batcher state out of range: epoch={epoch}, index={index}, batches={len(self)}")
        if index == len(self):
            epoch, index = epoch + 1, 0
        self.epoch, self.index = epoch, index


def build_loader(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int,
    batch_size: int,
    train_on_response_only: bool = True,
    packing: bool = False,
    group_by_length: bool = False,
    seed: int = 0,
    style: str = "finetune",
    **batcher_kwargs: Any,
) -> Batcher:
    """Records -> examples (``tokenize_records``) -> ``Batcher``.

    ``packing`` packs rows of ``max_length`` tokens; else ``group_by_length`` selects length-grouped
    batches; else plain shuffled batches. The pad id is the tokenizer's ``pad_token_id``, or its EOS.
    """
    if packing and group_by_length:
        raise ValueError("packing and group_by_length exclude each other; choose one")
    examples = tokenize_records(records, tokenizer, max_length, train_on_response_only, style=style)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    mode = "packing" if packing else "group_by_length" if group_by_length else "shuffle"
    return Batcher(
        examples,
        batch_size,
        pad_token_id=pad,
        mode=mode,
        seed=seed,
        block_size=max_length if packing else None,
        **batcher_kwargs,
    )
