"""Training throughput: this package's pipeline against the standard PyTorch one, in one run.

The same AlexNet, hyperparameters (Adam, lr 1e-4, batch 64, dropout 0.8) and number of steps on
the same images, trained two ways:
  reference  as the report would have written it: a CIFAR-10 dataset whose __getitem__ makes a
             PIL image from the uint8 array (torchvision.datasets.CIFAR10's own code, minus its
             checksum of the official files), PIL RandomCrop(32, padding=4), RandomHorizontalFlip,
             ToTensor and Normalize, in a DataLoader with 2 workers (the PyTorch CIFAR-10
             tutorial's setting), default Adam, fp32, NCHW;
  package    alexnet_mlflow.engine.train: uint8 data on the device, batched crops and flips,
             fused Adam; fp32 and --precision bf16.
Each case trains two epochs of --steps steps and reports the second: steady state, as in a
50-epoch run, without one-off start-up (oneDNN primitive creation takes ~1.5 s in bf16). The
reference restarts its DataLoader workers every epoch, as the tutorial's code does; that cost is
counted. Each case runs in its own process; the parent samples that process tree's memory
(DataLoader workers included) for the peak. The share of the CPU's own convolution throughput is the
training step's FLOP rate (3x the forward FLOPs per image, by torch's FLOP counter) over the
GFLOP/s of one large convolution measured here in the same precision.

    python bench/bench_train.py                    # 2 x 30 steps a case, random images
    python bench/bench_train.py --data-dir DIR     # real CIFAR-10 images from DIR (any layout)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

BATCH = 64


def images(args):
    import torch

    if args.data_dir:
        from alexnet_mlflow import layouts

        return layouts.load(layouts.resolve_data_dir(args.data_dir)).train_images[: args.steps * BATCH]
    gen = torch.Generator().manual_seed(0)  # speed does not depend on what the pixels show
    return torch.randint(0, 256, (args.steps * BATCH, 3, 32, 32), dtype=torch.uint8, generator=gen)


def run_reference(args) -> dict:
    import torch
    import torchvision.transforms as T
    from PIL import Image

    from alexnet_mlflow.model import AlexNet

    torch.manual_seed(0)
    data = images(args).permute(0, 2, 3, 1).contiguous().numpy()  # CIFAR10.data is (N, 32, 32, 3)
    labels = torch.randint(0, 10, (len(data),)).tolist()
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    class CIFAR10Arrays(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):  # torchvision.datasets.CIFAR10.__getitem__
            return transform(Image.fromarray(data[i])), labels[i]

    loader = torch.utils.data.DataLoader(CIFAR10Arrays(), batch_size=BATCH, shuffle=True, num_workers=2)
    model = AlexNet()
    model.normalize = torch.nn.Identity()  # the reference normalises in its transforms
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    for _epoch in range(2):  # the second is timed
        start = time.perf_counter()
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = criterion(model(inputs), targets)
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - start
    return {"images_per_second": len(data) / seconds}


def run_package(args, precision: str) -> dict:
    import torch

    from alexnet_mlflow import data, engine
    from alexnet_mlflow.config import TrainConfig

    train_images = images(args)
    labels = torch.randint(0, 10, (len(train_images),), generator=torch.Generator().manual_seed(0))
    few = (train_images[:BATCH], labels[:BATCH])  # validation is not what is measured
    splits = data.Splits((train_images, labels), few, (few[0][:0], few[1][:0]), data.CIFAR10_CLASSES)
    config = TrainConfig(epochs=2, batch_size=BATCH, precision=precision, device=args.device)
    result = engine.train(config, splits, engine.resolve_device(config.device))
    return {"images_per_second": result.history[1].images_per_second}  # the second epoch


def conv_gflops(precision: str, device: str) -> float:
    """GFLOP/s of one large 3x3 convolution (AlexNet's 192->384 layer at batch 256), forward;
    the best of 5 trials of 10 calls."""
    import torch

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    conv = torch.nn.Conv2d(192, 384, 3, padding=1).to(dev, dtype)
    x = torch.randn(256, 192, 8, 8, device=dev, dtype=dtype)
    flops = 2 * 384 * 192 * 9 * 8 * 8 * 256
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            conv(x)
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(10):
                conv(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return flops * 10 / best / 1e9


def worker(args) -> None:
    """One case, in this process: print its result as JSON."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    result = run_reference(args) if args.case.startswith("reference") else run_package(args, args.case.split("-")[1])
    result["conv_gflops"] = conv_gflops("bf16" if args.case.endswith("bf16") else "fp32", args.device)
    if torch.cuda.is_available() and args.device != "cpu":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def measure(case: str, args, env: dict[str, str]) -> dict:
    """Run one case in a child process with `env` added, sampling the peak memory of its process tree."""
    import psutil

    command = [sys.executable, __file__, "--case", case, "--steps", str(args.steps), "--device", args.device]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    peak, tree = 0, psutil.Process(child.pid)

    def sample() -> None:
        nonlocal peak
        while child.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, _ = child.communicate()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"case {case} failed")
    return json.loads(out.strip().splitlines()[-1]) | {"peak_rss_mb": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps of batch 64 per epoch; 2 epochs a case")
    parser.add_argument("--data-dir", help="real CIFAR-10 (any layout); default: random images")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return worker(args)

    from rich.console import Console
    from rich.table import Table

    from alexnet_mlflow.model import AlexNet, forward_flops
    from alexnet_mlflow.runtime import malloc_env

    step_gflop_per_image = 3 * forward_flops(AlexNet()) / 1e9  # forward + backward (2x)
    # The package's cases run as `alexnet-mlflow train` runs: with its malloc setting (runtime.py).
    # The reference runs as the report's code would, and once more with that setting, to show
    # how much of the difference the setting alone makes.
    fast_malloc = malloc_env()
    cases = {"reference": ("reference (PIL + DataLoader, Adam, fp32)", {}),
             "reference-malloc": ("reference + the package's malloc setting", fast_malloc),
             "package-fp32": ("alexnet-mlflow, fp32", fast_malloc),
             "package-bf16": ("alexnet-mlflow, --precision bf16", fast_malloc)}
    if not fast_malloc:  # not glibc: the setting does not exist here
        del cases["reference-malloc"]
    results = {case: measure(case, args, env) for case, (_, env) in cases.items()}
    base = results["reference"]["images_per_second"]
    table = Table(title=f"training throughput, AlexNet, batch {BATCH}, second of 2 epochs of {args.steps} steps, "
                        f"{os.cpu_count()} CPU threads, device {args.device}")
    for column in ("pipeline", "images/s", "vs reference", "peak memory (MB)", "conv GFLOP/s", "share of conv"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    for case, (label, _) in cases.items():
        r = results[case]
        share = r["images_per_second"] * step_gflop_per_image / r["conv_gflops"]
        memory = r.get("cuda_peak_mb", r["peak_rss_mb"])
        table.add_row(label, f"{r['images_per_second']:.1f}", f"{r['images_per_second'] / base:.2f}x",
                      f"{memory:,.0f}", f"{r['conv_gflops']:.0f}", f"{share:.0%}")
    Console().print(table)
    print(f"targets at batch 64 on CPU: fp32 >= 1.2x, bf16 >= 2x the reference; "
          f"a training step is {step_gflop_per_image:.2f} GFLOP an image")


if __name__ == "__main__":
    main()
