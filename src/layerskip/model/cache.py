"""Static, position-indexed decoding caches.

Both caches are preallocated for the whole generation and indexed by absolute position, so
"rolling back" rejected draft positions costs nothing: later writes simply overwrite them.
"""

from __future__ import annotations

import torch

from layerskip.model.config import ModelConfig


class KVCache:
    """Keys and values of every layer, laid out [layer, batch, kv_head, position, head_dim]."""

    def __init__(self, config: ModelConfig, capacity: int, *, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        # [batch, capacity], False at positions no query may attend to (the left padding of a batch of
        # prompts of different lengths); None: every position. RoPE scores depend only on the distance
        # between positions, so a left-padded row decodes as it would alone.
        self.attendable: torch.Tensor | None = None

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished sequences leave a batch)."""
        self.keys, self.values = self.keys[:, rows], self.values[:, rows]
        if self.attendable is not None:
            self.attendable = self.attendable[rows]

    def copy_position(self, source: int, target: int, row: int | None = None) -> None:
        """Every layer's key and value at slot `source` into slot `target` (an accepted tree draft's candidate),
        in one batch row or all."""
        rows = slice(None) if row is None else slice(row, row + 1)
        self.keys[:, rows, :, target] = self.keys[:, rows, :, source]
        self.values[:, rows, :, target] = self.values[:, rows, :, source]

    def set_attendable(self, start: int, end: int, value: bool, row: int | None = None) -> None:
        """Let queries see slots [start, end) or not (tree drafts hide siblings), in one batch row or all."""
        if self.attendable is None:
            self.attendable = torch.ones((self.keys.shape[1], self.capacity), dtype=torch.bool,
                                         device=self.keys.device)
        self.attendable[slice(None) if row is None else row, start:end] = value

    def row(self, index: int) -> "CacheRow":
        return CacheRow(self, index)

    def update(self, layer: int, start: int | torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write positions [start, start + T) of one layer (with a tensor [B], each batch row's own; with `rows`,
        batch row b into cache row rows[b]); return those rows' keys and values for [0, end), the end of the
        furthest row. With `start` a tensor [B, T] of each row's slots, the write and the result have static shapes
        (the rows' whole capacity, for a mask to cut; see model/static.py)."""
        if isinstance(start, torch.Tensor) and start.dim() == 2:
            return self.update_slots(layer, start, keys, values, rows)
        length = keys.shape[2]
        if isinstance(start, torch.Tensor) or rows is not None:
            firsts = start.tolist() if isinstance(start, torch.Tensor) else [start] * keys.shape[0]
            targets = rows.tolist() if rows is not None else range(len(firsts))
            for batch_row, (row, first) in enumerate(zip(targets, firsts)):
                self.keys[layer, row, :, first:first + length] = keys[batch_row]
                self.values[layer, row, :, first:first + length] = values[batch_row]
            end = max(firsts) + length
        else:
            end = start + length
            self.keys[layer, :, :, start:end] = keys
            self.values[layer, :, :, start:end] = values
        if rows is not None:
            return self.keys[layer, rows, :, :end], self.values[layer, rows, :, :end]
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def update_slots(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write batch row b's T positions into slots[b] (of cache row rows[b]) by indexing, without reading the
        positions back to Python, and return those rows' whole capacity: shapes that do not change with the
        position, so one compiled step (one CUDA graph) serves every position."""
        batch_rows = (rows if rows is not None else torch.arange(keys.shape[0], device=slots.device))[:, None]
        self.keys[layer][batch_rows, :, slots] = keys.transpose(1, 2)
        self.values[layer][batch_rows, :, slots] = values.transpose(1, 2)
        if rows is not None:
            return self.keys[layer, rows], self.values[layer, rows]
        return self.keys[layer], self.values[layer]


class CacheRow:
    """One sequence's row of a batch's KVCache, as its strategy sees it: changes write through to the batch."""

    def __init__(self, cache: KVCache, row: int):
        self.cache, self.index = cache, row

    @property
    def keys(self) -> torch.Tensor:
        return self.cache.keys[:, self.index:self.index + 1]

    @property
    def values(self) -> torch.Tensor:
        return self.cache.values[:, self.index:self.index + 1]

    @property
    def attendable(self) -> torch.Tensor | None:
        attendable = self.cache.attendable
        return None if attendable is None else attendable[self.index:self.index + 1]

    def copy_position(self, source: int, target: int) -> None:
        self.cache.copy_position(source, target, self.index)

    def set_attendable(self, start: int, end: int, value: bool) -> None:
        self.cache.set_attendable(start, end, value, self.index)


class ExitHiddenBuffer:
    """Hidden states leaving the exit layer's last draft layer, per position.

    The draft stage writes them; verification feeds them straight into layer E, so the layers
    below the exit never run twice for one position.
    """

    def __init__(self, config: ModelConfig, capacity: int, *, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.hidden = torch.zeros((batch_size, capacity, config.hidden_size), dtype=dtype, device=device)

    def write(self, start: int, hidden: torch.Tensor) -> None:
        self.hidden[:, start:start + hidden.shape[1]] = hidden

    def read(self, start: int, end: int) -> torch.Tensor:
        return self.hidden[:, start:end]

    def copy_position(self, source: int, target: int) -> None:
        self.hidden[:, target] = self.hidden[:, source]
