"""Training images per second: the device-resident pipeline next to DataLoaders, on real CIFAR-10.

Contenders, each delivering normalised, randomly cropped (padding 4) and flipped batches of
128 images of CIFAR-10's 40,000 training images on the CPU:

- device:   our device pipeline (data.pipeline = device): whole uint8 batches gathered, cropped,
            flipped and normalised at once
- loader-N: our loader pipeline (data.pipeline = loader) with N worker processes
- paper-N:  a DataLoader serving PIL images as torchvision's CIFAR10 does, with the paper's
            per-sample transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
            Normalize), N workers

They run in rounds, one after the other, so that all see the same machine load; the table gives
each contender's median images/s over the rounds and its ratio to the device pipeline.

    python bench/data_pipeline.py                       # data/cifar-10-batches-py, 3 rounds
    python bench/data_pipeline.py --root DIR --rounds 5 --batches 60
"""

import argparse
import pathlib
import statistics
import sys
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from source.data import build_datasets, build_pipelines  # noqa: E402
from source.data.transforms import NORMALIZATION  # noqa: E402

BATCH_SIZE = 128


class PaperImages(Dataset):
    """The training images as PIL images through ``transform``, as torchvision's CIFAR10 serves them."""

    def __init__(self, split, transform):
        self.images = split.store.inputs[split.indices].permute(0, 2, 3, 1).numpy()
        self.targets = split.store.targets[split.indices].tolist()
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.targets[index]


def images_per_second(batches, count):
    """Images/s of the first ``count`` batches of the iterable ``batches`` (creating it included)."""
    start = time.perf_counter()
    images = 0
    for index, batch in enumerate(batches):
        images += len(batch[1])
        if index + 1 == count:
            break
    return images / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data", help="folder holding cifar-10-batches-py (default: data)")
    parser.add_argument("--batches", type=int, default=40, help="batches per contender and round (default: 40)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts (default: 0 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process (default: 1)")
    parser.add_argument("--train-size", type=int, help="training samples (default: the paper's 40,000)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    cpu = torch.device("cpu")

    splits = build_datasets("cifar10", options.root, train_size=options.train_size)

    def ours(choice, workers):
        training = build_pipelines(
            splits,
            choice=choice,
            device=cpu,
            batch_size=BATCH_SIZE,
            evaluation_batch_size=BATCH_SIZE,
            seed=0,
            num_workers=workers,
        ).training
        return lambda epoch: training.epoch(epoch)

    mean, std = NORMALIZATION["cifar10"]
    paper_transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    paper_set = PaperImages(splits.train, paper_transform)

    def paper(workers):
        loader = DataLoader(
            paper_set, batch_size=BATCH_SIZE, shuffle=True, drop_last=True, num_workers=workers,
            persistent_workers=workers > 0,
        )
        return lambda epoch: iter(loader)

    contenders = {"device": ours("device", 0)}
    for workers in options.workers:
        contenders[f"loader-{workers}"] = ours("loader", workers)
    for workers in options.workers:
        contenders[f"paper-{workers}"] = paper(workers)

    rates = {name: [] for name in contenders}
    for round_number in range(options.rounds):
        for name, epoch_batches in contenders.items():
            rates[name].append(images_per_second(epoch_batches(round_number), options.batches))
        print(f"round {round_number + 1}/{options.rounds} done", file=sys.stderr)

    device_rate = statistics.median(rates["device"])
    print(f"CIFAR-10 training batches of {BATCH_SIZE}, {options.batches} batches x {options.rounds} rounds, "
          f"{options.threads} torch thread(s) in the main process")
    print("| contender | images/s (median) | device ÷ contender |")
    print("|---|---|---|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:,.0f} | {device_rate / rate:.1f}× |")


if __name__ == "__main__":
    main()
