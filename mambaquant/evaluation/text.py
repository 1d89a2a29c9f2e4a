"""Language-model metrics."""

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def bits_per_byte(model, text: bytes, window: int = 256, batch_size: int = 16, max_windows: int | None = None):
    """Mean next-byte negative log-likelihood in bits. The text is cut into windows of window+1 bytes that overlap
    by one, so every byte after the first is predicted exactly once, from the bytes before it in its window."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    count = (len(data) - 1) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"text of {len(data)} bytes is shorter than one window of {window + 1}")
    windows = torch.stack([data[i * window : i * window + window + 1] for i in range(count)])
    total_nll = 0.0
    for batch in windows.split(batch_size):
        logits = model(batch[:, :-1])
        total_nll += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
    return total_nll / (count * window) / math.log(2), count
