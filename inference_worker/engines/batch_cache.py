"""A KV cache that decodes many sequences of different lengths in one forward pass.

The transformers engine's step loop keeps one :class:`BatchKVCache` per group of requests that
share a forward pass. Each row is one sequence and keeps its keys and values at columns
``[0, length)`` of per-layer buffers allocated ahead (grown geometrically), so:

* a decode step writes one column per row in place. ``DynamicLayer`` instead re-concatenates
  the whole cache every step, which at 32 rows copied more bytes than the forward pass
  computed on a CPU (70% of the step in a profile);
* rows of different lengths need no shifting: the columns past a row's length are padding,
  hidden by the attention mask from :meth:`BatchKVCache.step_inputs`, and each row's new token
  gets its own position id, so the numbers match decoding that sequence alone;
* a sequence joins by copying its prefill cache into a free row and leaves by moving the last
  row into its place: work proportional to one sequence, never to the batch.

Only caches made of plain full-attention ``DynamicLayer`` s can join (see
:meth:`BatchKVCache.accepts`); sliding-window, linear-attention or quantized caches keep their
own cache and decode alone.

Imports torch and transformers; only the transformers engine imports this module.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["BatchKVCache"]

# Columns are allocated in multiples of this, so short growths do not reallocate every step.
_COLUMN_QUANTUM = 64


class _BatchLayer(DynamicLayer):
    """One model layer's view of a :class:`BatchKVCache`: the model calls ``update`` on it."""

    def __init__(self, owner: BatchKVCache, index: int) -> None:
        super().__init__()
        self.owner = owner
        self.index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the owner allocates the buffers when sequences join."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner._write(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.owner.span

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.span + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BatchKVCache rows cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("BatchKVCache rows join with BatchKVCache.add")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("BatchKVCache rows leave with BatchKVCache.remove")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("BatchKVCache does not do beam search")


class BatchKVCache(DynamicCache):
    """Keys and values of several sequences, one row each, for batched one-token decode steps.

    A step is: :meth:`step_inputs` (attention mask and position ids for the forward pass), the
    model's forward pass with ``past_key_values=self`` and one new token per row, then
    :meth:`advance`. Rows join with :meth:`add` and leave with :meth:`remove` between steps.
    Not thread-safe: one step loop owns it.

    Args:
        max_rows: Rows the caller will ever add at once; buffers grow geometrically but not
            past it (the caller enforces it, this only sizes allocations).
        max_columns: Likewise for a row's length (the model's context).
    """

    def __init__(self, *, max_rows: int, max_columns: int) -> None:
        super().__init__()
        self._max_rows = max_rows
        self._max_columns = max_columns
        self.lengths: list[int] = []
        # The longest row: columns the next forward pass attends to, before its new token.
        self.span = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        # Set by step_inputs for the forward pass that follows: where each row's new column goes.
        self._uniform = True
        self._rows_index: torch.Tensor | None = None
        self._cols_index: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """Sequences in the batch."""
        return len(self.lengths)

    @staticmethod
    def accepts(cache: Any) -> bool:
        """True for a one-sequence prefill cache of plain full-attention layers."""
        if type(cache) is not DynamicCache or not cache.layers:
            return False
        for layer in cache.layers:
            if type(layer) is not DynamicLayer or layer.keys is None or layer.keys.dim() != 4:
                return False
            if layer.keys.shape[0] != 1:
                return False
        return True

    def add(self, cache: DynamicCache) -> int:
        """Copy a prefill cache (one sequence, see :meth:`accepts`) into a new row; its index."""
        layers = cache.layers
        length = int(layers[0].keys.shape[-2])
        row = self.rows
        if not self._keys:
            self.layers = [_BatchLayer(self, i) for i in range(len(layers))]
            self._keys = [self._alloc(layer.keys, 1, length) for layer in layers]
            self._values = [self._alloc(layer.values, 1, length) for layer in layers]
        self._reserve(row + 1, length)
        for i, layer in enumerate(layers):
            self._keys[i][row, :, :length].copy_(layer.keys[0])
            self._values[i][row, :, :length].copy_(layer.values[0])
        self.lengths.append(length)
        self.span = max(self.span, length)
        return row

    def remove(self, row: int) -> None:
        """Drop a row; the last row moves into its place (callers reorder their rows alike)."""
        last = self.rows - 1
        if row != last:
            length = self.lengths[last]
            for buffers in (self._keys, self._values):
                for buf in buffers:
                    buf[row, :, :length].copy_(buf[last, :, :length])
            self.lengths[row] = length
        self.lengths.pop()
        self.span = max(self.lengths, default=0)
        if not self.lengths:
            # Nothing left: give the memory back rather than hold the high-water mark.
            self._keys, self._values, self.layers = [], [], []

    def step_inputs(self, device: torch.device | str) -> tuple[torch.Tensor | None, ...]:
        """The attention mask and position ids of the next one-token forward pass.

        Both are None when every row has the same length: nothing is padding then, and the
        model's defaults (no mask, position = cache length) are right and cheaper.
        """
        self._reserve(self.rows, self.span + 1)
        lengths = self.lengths
        self._uniform = all(n == self.span for n in lengths)
        if self._uniform:
            return None, None
        cols = torch.tensor(lengths, dtype=torch.long, device=device)
        self._cols_index = cols
        self._rows_index = torch.arange(len(lengths), device=device)
        # Row r sees its own columns [0, length] (the new token included), nothing after.
        mask = torch.arange(self.span + 1, device=device)[None, :] <= cols[:, None]
        return mask, cols[:, None]

    def advance(self) -> None:
        """Account for the column every row gained in the forward pass."""
        self.lengths = [n + 1 for n in self.lengths]
        self.span += 1

    def _write(
        self, index: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._keys[index], self._values[index]
        n, span = self.rows, self.span
        if self._uniform:
            keys[:n, :, span : span + 1].copy_(key_states)
            values[:n, :, span : span + 1].copy_(value_states)
        else:
            rows, cols = self._rows_index, self._cols_index
            keys[rows, :, cols] = key_states[:, :, 0]
            values[rows, :, cols] = value_states[:, :, 0]
        return keys[:n, :, : span + 1], values[:n, :, : span + 1]

    def _alloc(self, like: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        rounded = -(-columns // _COLUMN_QUANTUM) * _COLUMN_QUANTUM
        columns = max(columns, min(rounded, self._max_columns))
        return like.new_zeros((rows, like.shape[1], columns, like.shape[3]))

    def _reserve(self, rows: int, columns: int) -> None:
        """Grow the buffers (geometrically, copying the used part) to hold rows x columns."""
        if not self._keys:
            return
        have_rows, have_cols = self._keys[0].shape[0], self._keys[0].shape[2]
        if rows <= have_rows and columns <= have_cols:
            return
        # Doubling keeps growth amortised; the limits keep a GPU from holding twice the cache
        # the replica can ever use.
        new_rows = max(rows, min(2 * have_rows, self._max_rows)) if rows > have_rows else have_rows
        new_cols = have_cols
        if columns > have_cols:
            new_cols = max(columns, min(2 * have_cols, self._max_columns))
        n, span = self.rows, self.span
        for buffers in (self._keys, self._values):
            for i, old in enumerate(buffers):
                new = self._alloc(old, new_rows, new_cols)
                new[:n, :, :span].copy_(old[:n, :, :span])
                buffers[i] = new
