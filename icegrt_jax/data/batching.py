"""Length-bucketed batches, deterministic per-epoch shuffling and an exactly resumable iterator.

Every batch is a dict of ``[B, T]`` int32 numpy arrays, ``B = batch_size`` always and ``T`` the
smallest bucket length >= the longest example in the batch (so there are at most
``len(buckets)`` distinct shapes):

- ``input_ids``: the tokens, right-padded with ``pad_id``.
- ``attention_mask``: 1 on real tokens, 0 on padding.
- ``targets``: the next token, ``targets[:, t] = input_ids[:, t + 1]``; ``pad_id`` at ``t = T-1``.
- ``loss_mask``: 1 at ``t`` iff ``targets[:, t]`` is a response token or a round's EOS (the
  example's ``response_mask[t + 1]``); 0 on template, prompt and padding, and on filler rows.

So the model reads ``input_ids`` and the SFT loss is
``sum(loss_mask * -log p(targets | logits)) / sum(loss_mask)`` with ``logits[:, t]`` computed from
``input_ids[:, :t + 1]`` (``losses.sft_loss(logits, targets, loss_mask)``).

An epoch visits every example once. When ``batch_size`` does not divide the number of examples,
the epoch's last batch is completed with *filler rows*: examples repeated from the start of the
epoch's order, real tokens that keep the shape fixed, with ``loss_mask`` all 0 so the loss of an
epoch still counts each example exactly once.
"""

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from icegrt_jax.data.sources import DataError
from icegrt_jax.data.tokenize import TokenizedExample

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class DataPosition:
    """Where the iterator stands: the next batch is batch ``index`` of epoch ``epoch``.

    Saved with checkpoints as ``dataclasses.asdict(position)``, i.e. ``{"epoch": e, "index": i}``.
    """

    epoch: int = 0
    index: int = 0


class PlannedBatch(NamedTuple):
    """Example indices of one batch; rows from ``num_counted`` on are filler (no loss)."""

    indices: np.ndarray
    num_counted: int


def bucket_lengths(boundaries: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The padded lengths in use: the boundaries below ``max_length``, then ``max_length``."""
    return tuple(sorted({b for b in boundaries if b < max_length} | {max_length}))


def padded_length(longest: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``longest``."""
    position = int(np.searchsorted(buckets, longest))
    if position == len(buckets):
        raise DataError(f"an example of {longest} tokens exceeds the largest bucket {buckets[-1]}")
    return buckets[position]


def plan_epoch(lengths: np.ndarray, batch_size: int, buckets: Sequence[int],
               rng: np.random.Generator | None, group_by_length: bool) -> list[PlannedBatch]:
    """The batches of one epoch, a pure function of its arguments.

    The examples are permuted by ``rng`` (kept in order when None). With ``group_by_length`` they
    are then stably sorted by bucket, cut into batches, and the batch order is permuted by ``rng``,
    so a batch's examples share a bucket (except at most one batch per bucket edge).
    """
    if len(lengths) == 0:
        return []
    order = np.arange(len(lengths)) if rng is None else rng.permutation(len(lengths))
    if group_by_length:
        order = order[np.argsort(np.searchsorted(buckets, lengths[order]), kind="stable")]
    batches = [PlannedBatch(order[i:i + batch_size], batch_size)
               for i in range(0, len(order), batch_size)]
    last = batches[-1].indices
    if len(last) < batch_size:
        filler = np.resize(order, batch_size - len(last))
        batches[-1] = PlannedBatch(np.concatenate([last, filler]), len(last))
    if group_by_length and rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(examples: Sequence[TokenizedExample], buckets: Sequence[int], pad_id: int,
            num_counted: int | None = None) -> Batch:
    """Pad ``examples`` into one batch (see the module docstring); rows from ``num_counted`` on
    get no loss."""
    length = padded_length(max(len(e) for e in examples), buckets)
    input_ids = np.full((len(examples), length), pad_id, np.int32)
    attention_mask = np.zeros((len(examples), length), np.int32)
    response_mask = np.zeros((len(examples), length), np.int32)
    for row, example in enumerate(examples):
        input_ids[row, :len(example)] = example.input_ids
        attention_mask[row, :len(example)] = 1
        response_mask[row, :len(example)] = example.response_mask
    if num_counted is not None:
        response_mask[num_counted:] = 0
    last_column = np.zeros((len(examples), 1), np.int32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": np.concatenate([input_ids[:, 1:], last_column + pad_id], axis=1),
        "loss_mask": np.concatenate([response_mask[:, 1:], last_column], axis=1),
    }


class BatchIterator:
    """Endless training batches, epoch after epoch, resumable from a ``DataPosition``.

    Epoch ``e``'s batches are ``plan_epoch(..., rng=np.random.default_rng((seed, e)))``, so they
    depend only on the examples, the settings, the seed and ``e``: restarting from a saved
    ``position`` yields exactly the batches the interrupted run would have produced next.
    """

    def __init__(self, examples: Sequence[TokenizedExample], *, batch_size: int,
                 buckets: Sequence[int], pad_id: int, seed: int, group_by_length: bool = True,
                 position: DataPosition = DataPosition(), collate_fn: Callable | None = None):
        if not examples:
            raise DataError("no examples to batch (the files are empty or every example was dropped)")
        longest = max(examples, key=len)
        if len(longest) > buckets[-1]:
            raise DataError(f"{longest.source}: {len(longest)} tokens exceed the largest "
                            f"bucket {buckets[-1]}")
        self._examples = list(examples)
        self._lengths = np.array([len(e) for e in examples])
        self._batch_size, self._buckets, self._pad_id = batch_size, tuple(buckets), pad_id
        self._seed, self._group_by_length = seed, group_by_length
        self._collate = collate_fn or collate
        self._plan: tuple[int, list[PlannedBatch]] | None = None
        self.position = position

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self._examples) / self._batch_size)

    @functools.cached_property
    def fingerprint(self) -> str:
        """What a saved data position refers to: the examples' count and a CRC-32 of their token
        ids and masks in order (not where they came from: moved files with the same content match)."""
        crc = 0

        def feed(value):
            nonlocal crc
            if dataclasses.is_dataclass(value):
                for field in dataclasses.fields(value):
                    feed(getattr(value, field.name))
            elif isinstance(value, np.ndarray):
                crc = zlib.crc32(np.int64(value.size).tobytes() + value.tobytes(), crc)

        for example in self._examples:
            feed(example)
        return f"{len(self._examples)} examples, CRC-32 {crc:08x}"

    @property
    def position(self) -> DataPosition:
        """Where the next batch comes from; set it to resume."""
        return self._position

    @position.setter
    def position(self, position: DataPosition) -> None:
        if position.epoch < 0 or position.index < 0:
            raise DataError(f"data position {position} is negative")
        if position.index >= self.batches_per_epoch:  # only a restored position can be past the end
            raise DataError(f"the training data (or batch size) changed since the checkpoint: an epoch is now "
                            f"{self.batches_per_epoch} batches, the checkpoint was at batch index {position.index} "
                            f"of epoch {position.epoch}; resume with the run's data, or start a new run in a new "
                            "training.output_dir")
        self._position = position

    def plan(self, epoch: int) -> list[PlannedBatch]:
        """The batches of ``epoch`` (cached for the current epoch)."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng((self._seed, epoch))
            self._plan = epoch, plan_epoch(self._lengths, self._batch_size, self._buckets, rng,
                                           self._group_by_length)
        return self._plan[1]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        epoch, index = self.position.epoch, self.position.index
        planned = self.plan(epoch)[index]
        last = index + 1 == self.batches_per_epoch
        self.position = DataPosition(epoch + 1, 0) if last else DataPosition(epoch, index + 1)
        return self._collate([self._examples[i] for i in planned.indices], self._buckets, self._pad_id,
                             planned.num_counted)


def eval_batches(examples: Sequence[TokenizedExample], *, batch_size: int, buckets: Sequence[int], pad_id: int,
                 collate_fn: Callable | None = None, progress: bool = False) -> Iterator[Batch]:
    """One unshuffled pass, grouped by length; each example counted exactly once (``progress``:
    a bar over the batches, removed when the pass ends)."""
    collate_fn = collate_fn or collate
    lengths = np.array([len(e) for e in examples])
    plans = plan_epoch(lengths, batch_size, buckets, rng=None, group_by_length=True)
    for planned in tqdm(plans, desc="eval", unit="batch", leave=False, disable=not progress):
        yield collate_fn([examples[i] for i in planned.indices], buckets, pad_id, planned.num_counted)
