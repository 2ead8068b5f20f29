"""PyTorch reference train step for DenseNet121 (14 labels), for comparison with chexnet_jax.

The model is torchvision's `densenet121(weights=None, num_classes=14)`, the architecture most
CheXNet reproductions use. Step: uint8 grey batch -> ImageNet normalisation on device ->
forward/backward under AMP (bf16 or fp16 + GradScaler; none for float32), channels_last,
BCEWithLogits, Adam 1e-3. Modes: `eager` and `compile` (torch.compile).

    python benchmarks/torch_reference.py --image_size 224 --batch_size 64 --dtype bfloat16 \
        --mode eager --json

When torchvision is not importable the script prints a row whose status says so and exits 0,
unless `--standin` is given: then a self-contained DenseNet121 (same layers and parameter count as
torchvision's, written below) is used. The stand-in exists ONLY for the CPU comparison on machines
where torchvision cannot be installed; its rows are labelled 'standin'.
"""

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

NUM_CLASSES = 14
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class _DenseLayer(nn.Module):
  """BN-ReLU-Conv1x1 (4k) -> BN-ReLU-Conv3x3 (k), output concatenated to the input."""

  def __init__(self, in_ch, growth, bn_size):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(in_ch)
    self.conv1 = nn.Conv2d(in_ch, bn_size * growth, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(bn_size * growth)
    self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

  def forward(self, x):
    y = self.conv1(F.relu(self.norm1(x)))
    y = self.conv2(F.relu(self.norm2(y)))
    return torch.cat([x, y], 1)


class _Transition(nn.Sequential):
  def __init__(self, in_ch, out_ch):
    super().__init__(
      nn.BatchNorm2d(in_ch), nn.ReLU(), nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.AvgPool2d(2, 2)
    )


class StandinDenseNet121(nn.Module):
  """torchvision's DenseNet121 layout (growth 32, blocks 6-12-24-16, bn_size 4), for CPU only."""

  def __init__(self, num_classes=NUM_CLASSES, growth=32, blocks=(6, 12, 24, 16), bn_size=4):
    super().__init__()
    ch = 2 * growth
    layers = [
      nn.Conv2d(3, ch, 7, 2, 3, bias=False),
      nn.BatchNorm2d(ch),
      nn.ReLU(),
      nn.MaxPool2d(3, 2, 1),
    ]
    for i, n in enumerate(blocks):
      for _ in range(n):
        layers.append(_DenseLayer(ch, growth, bn_size))
        ch += growth
      if i != len(blocks) - 1:
        layers.append(_Transition(ch, ch // 2))
        ch //= 2
    layers += [nn.BatchNorm2d(ch), nn.ReLU()]
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Linear(ch, num_classes)

  def forward(self, x):
    x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
    return self.classifier(x)


def build_model(standin):
  """Returns (model, source) or (None, reason) when torchvision is missing and no stand-in."""
  try:
    import torchvision  # pylint: disable=g-import-not-at-top

    return torchvision.models.densenet121(weights=None, num_classes=NUM_CLASSES), 'torchvision'
  except Exception:  # ImportError, or a torchvision built for another torch.
    if not standin:
      return None, 'torchvision missing'
  return StandinDenseNet121(), 'standin (self-contained DenseNet121, CPU comparison only)'


def make_step(model, opt, device, dtype, scaler):
  """One training step on a uint8 [B,1,S,S] batch; normalisation on device like chexnet_jax."""
  mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
  loss_fn = nn.BCEWithLogitsLoss()
  amp = dtype != torch.float32

  def step(images, labels):
    x = (images.float().div(255.0).expand(-1, 3, -1, -1) - mean) / std
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype, enabled=amp):
      loss = loss_fn(model(x).float(), labels)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()

  return step


def sync(device):
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def time_steps(step, batches, device, warmup, steps):
  """Runs warmup (untimed, includes torch.compile) then `steps` timed steps.

  Returns (step times, warm-up seconds, process CPU seconds per timed step).
  """
  t0 = time.perf_counter()
  for i in range(warmup):
    step(*batches[i % len(batches)])
  sync(device)
  warmup_s = time.perf_counter() - t0
  times, cpu_start = [], time.process_time()
  for i in range(steps):
    t = time.perf_counter()
    loss = step(*batches[i % len(batches)])
    sync(device)
    times.append(time.perf_counter() - t)
  if not torch.isfinite(loss):
    raise FloatingPointError(f'non-finite loss {loss.item()}')
  return times, warmup_s, (time.process_time() - cpu_start) / steps


def random_batches(n, batch, size, device):
  g = torch.Generator().manual_seed(0)
  out = []
  for _ in range(n):
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 2, (batch, NUM_CLASSES), generator=g).float()
    out.append((images.to(device), labels.to(device)))
  return out


def run(args):
  """Returns a result dict (status 'ok' or the reason it did not run)."""
  row = {
    'framework': 'torch',
    'torch': torch.__version__,
    'mode': args.mode,
    'image_size': args.image_size,
    'batch_size': args.batch_size,
    'dtype': args.dtype,
  }
  model, source = build_model(args.standin)
  row['model_source'] = source
  if model is None:
    return dict(row, status=source)
  device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
  if args.threads:
    torch.set_num_threads(args.threads)
  row['device'] = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
  # Let cuDNN pick the fastest conv algorithms, as any tuned PyTorch trainer does.
  torch.backends.cudnn.benchmark = True
  dtype = getattr(torch, args.dtype)
  model = model.to(device, memory_format=torch.channels_last).train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  # fp16 needs loss scaling; bf16/fp32 pass through a disabled scaler.
  scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
  step = make_step(model, opt, device, dtype, scaler)
  if args.mode == 'compile':
    step = torch.compile(step)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  batches = random_batches(2, args.batch_size, args.image_size, device)
  times, warmup_s, cpu_s = time_steps(step, batches, device, args.warmup, args.steps)
  med = statistics.median(times)
  row.update(
    status='ok',
    params=sum(p.numel() for p in model.parameters()),
    warmup_s=warmup_s,
    step_time_median_s=med,
    step_time_min_s=min(times),
    step_time_max_s=max(times),
    images_per_s=args.batch_size / med,
    host_cpu_s_per_step=cpu_s,
    threads=torch.get_num_threads(),
  )
  if device.type == 'cuda':
    row['peak_memory_bytes'] = torch.cuda.max_memory_allocated(device)
  return row


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batch_size', type=int, default=64, help='per device (one device)')
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
  p.add_argument('--mode', default='eager', choices=['eager', 'compile'])
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--device', default='', help="default: 'cuda' when available, else 'cpu'")
  p.add_argument(
    '--threads', type=int, default=0, help='CPU intra-op threads (0: torch default, one per core)'
  )
  p.add_argument(
    '--standin',
    action='store_true',
    help='use the self-contained DenseNet121 if torchvision is missing (CPU only)',
  )
  p.add_argument('--json', action='store_true', help='print one JSON line instead of text')
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  row = run(args)
  if args.json:
    print(json.dumps(row), flush=True)
  else:
    for k, v in row.items():
      print(f'{k:>22}: {v}')


if __name__ == '__main__':
  main(sys.argv[1:])
