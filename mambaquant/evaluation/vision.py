"""Top-1 accuracy of a CIFAR-10 vision model."""

import torch

from ..data import cifar10, normalise_images


@torch.no_grad()
def cifar10_top1(model, max_samples: int | None = None, reference=None, batch_size: int = 250):
    """Top-1 % on the CIFAR-10 test split (full when the data directory has it, else the shipped stratified
    subset); `max_samples` takes a fixed, seeded random subset. Returns (top1, agreement or None, count, protocol)."""
    images, labels, description = cifar10("test")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    if max_samples is not None and max_samples < len(labels):
        order = order[:max_samples]
        description += f", fixed random subset of {max_samples}"
    x, y = normalise_images(images[order.numpy()]), torch.from_numpy(labels[order.numpy()])
    top1, agreement = top1_and_agreement(model, reference, x, y, batch_size)
    return top1, agreement, len(y), f"{description}, top-1 %"


@torch.no_grad()
def top1_and_agreement(model, reference, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """Top-1 % of the model's argmax against `labels`, and % agreement with the reference's argmax (or None)."""
    predictions = torch.cat([model(batch).argmax(-1) for batch in inputs.split(batch_size)])
    agreement = None
    if reference is not None:
        reference_predictions = torch.cat([reference(batch).argmax(-1) for batch in inputs.split(batch_size)])
        agreement = 100.0 * (predictions == reference_predictions).float().mean().item()
    return 100.0 * (predictions == labels).float().mean().item(), agreement
