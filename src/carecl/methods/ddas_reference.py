"""DDAS's reference autoencoder (the authors' AE_0, trained on TinyImageNet): generic images whose winning
autoencoder sends a test batch to the frozen CLIP. Trained once, before the first task's autoencoder, on
the images under `ddas.reference_root` (class sub-folders, read recursively) with the task data's training
transform, by the same rule as a task's autoencoder (Adam, lr x 0.1 every 10 epochs, `reference_steps`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from carecl.data.base import DatasetError, ImageSplit, TaskDataset
from carecl.data.imagefolder import list_class_folders, list_images
from carecl.methods.base import TaskContext


def reference_images(root: str) -> list[str]:
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"method.ddas.reference_root: {folder} is not a folder")
    images = [path for _, class_dir in sorted(list_class_folders(folder).items()) for path in list_images(class_dir)]
    if not images:
        raise DatasetError(f"method.ddas.reference_root: {folder} holds no images in class sub-folders")
    return images


def train_reference_autoencoder(selector, context: TaskContext, transform, batch_size: int, seed: int) -> None:
    config = selector.config
    images = reference_images(config.reference_root)
    split = ImageSplit(images, np.zeros(len(images), dtype=np.int64))
    dataset = TaskDataset(split, np.zeros(1, dtype=np.int64), 0, 1, transform)
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, replacement=False, num_samples=None, generator=generator)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False)
    autoencoder = selector.autoencoders[0].to(context.device)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps, per_epoch = config.reference_steps, max(len(loader), 1)
    progress = tqdm(total=steps, desc="DDAS reference autoencoder", leave=False, disable=not context.progress)
    step = 0
    while step < steps:
        for batch, _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * 0.1 ** (step // per_epoch // 10)
            loss = selector.training_loss(batch.to(context.device), autoencoder)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            progress.update()
            if step == steps:
                break
    progress.close()
