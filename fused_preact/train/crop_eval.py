"""Top-1 and top-5 error on the ImageNet validation folder at several crop sizes
(``--eval-crops``): the paper's Table 5 tests a 224x224 center crop of images
resized to 256 and a 320x320 crop of images resized to 320; the nets are fully
convolutional (global average pooling), so they take either size."""
from __future__ import annotations

import torch

from . import distributed
from .imagenet_transforms import eval_transform
from .streams import loader_eval_batches


def crop_name(resize: int, crop: int) -> str:
    return f"{resize}:{crop}"


def crop_errors(trainer, crops: list[tuple[int, int]]) -> dict:
    """``{"RESIZE:CROP": {"top1": e1, "top5": e5, "images": n}}`` of ``trainer``'s model, over all processes."""
    from torchvision import datasets

    args, p, model = trainer.args, trainer.processes, trainer.model
    val_root = trainer.test_set.root   # an ImageFolder
    results = {}
    model.eval()
    for resize, crop in crops:
        dataset = datasets.ImageFolder(val_root, eval_transform(resize, crop))
        batches = loader_eval_batches(dataset, trainer.normalize, args.eval_batch_size, trainer.device,
                                      args.workers, p.rank, p.world_size)
        top1 = torch.zeros((), dtype=torch.float64, device=trainer.device)
        top5 = torch.zeros_like(top1)
        count = 0
        with torch.no_grad(), trainer.autocast():
            for images, labels in batches:
                if args.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                logits = model(images)
                best = logits.topk(min(5, logits.shape[1]), dim=1).indices
                top1 += (best[:, 0] != labels).sum()
                top5 += (best != labels[:, None]).all(dim=1).sum()
                count += labels.numel()
        wrong1, wrong5, count = distributed.all_sum([top1.item(), top5.item(), float(count)], trainer.device, p)
        results[crop_name(resize, crop)] = {"top1": wrong1 / count, "top5": wrong5 / count, "images": int(count)}
    model.train()
    return results
