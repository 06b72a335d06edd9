"""Top-1 and top-5 error on the ImageNet validation folder at several crop sizes
(``--eval-crops``): the paper's Table 5 tests a 224x224 center crop of images
resized to 256 and a 320x320 crop of images resized to 320; the nets are fully
convolutional (global average pooling), so they take either size."""
from __future__ import annotations

from .imagenet_transforms import eval_transform
from .streams import loader_eval_batches


def crop_name(resize: int, crop: int) -> str:
    return f"{resize}:{crop}"


def crop_errors(trainer, crops: list[tuple[int, int]]) -> dict:
    """``{"RESIZE:CROP": {"top1": e1, "top5": e5, "images": n}}`` of ``trainer``'s model, over all processes."""
    from torchvision import datasets

    args, p = trainer.args, trainer.processes
    val_root = trainer.test_set.root   # an ImageFolder
    results = {}
    for resize, crop in crops:
        dataset = datasets.ImageFolder(val_root, eval_transform(resize, crop))
        batches = loader_eval_batches(dataset, trainer.normalize, args.eval_batch_size, trainer.device,
                                      args.workers, p.rank, p.world_size)
        _, top1, top5, count = trainer.evaluate_batches(batches)
        results[crop_name(resize, crop)] = {"top1": top1, "top5": top5, "images": count}
    return results
