"""Which learning-rate rule keeps a global batch of 1024 as good as batch 64?

  python benchmarks/large_batch.py [--epochs 8] [--train_size 8192] [--runs all]

Trains the tiny DenseNet of configs/cpu_smoke.py on its learnable synthetic data
(32 px) with `python -m chexnet_jax.main`, once at global batch 64 on 1 device
and once per rule at global batch 1024 on 16 simulated CPU devices
(--xla_force_host_platform_device_count=16): 64 images per device in both, so
BatchNorm sees per-device batches of 64 as on 16 V100s. Every run sees the same
number of epochs (same images, same compute), starts from Adam 1e-3 at batch 64
(the recipe's rate), uses the plateau schedule, and is scored on 1024 validation
images. Prints a Markdown table: final and best validation mean AUROC, the
largest training loss after the first epoch (stability) and wall time.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (global batch, devices, config overrides)
RUNS = {
  'b64': (64, 1, {}),
  'b1024_none_warmup': (1024, 16, {'lr_scaling': 'none', 'warmup_epochs': 1.0}),
  'b1024_sqrt_warmup': (1024, 16, {'lr_scaling': 'sqrt', 'warmup_epochs': 1.0}),
  'b1024_linear_warmup': (1024, 16, {'lr_scaling': 'linear', 'warmup_epochs': 1.0}),
  'b1024_linear': (1024, 16, {'lr_scaling': 'linear', 'warmup_epochs': 0.0}),
  'b1024_sqrt': (1024, 16, {'lr_scaling': 'sqrt', 'warmup_epochs': 0.0}),
}


def run(name, args, root):
  batch, devices, overrides = RUNS[name]
  workdir = os.path.join(root, name)
  settings = {
    'batch_size': batch,
    'eval_batch_size': 1024,
    'learning_rate': 1e-3,
    'lr_base_batch_size': 64,
    'lr_schedule': 'plateau',
    'synthetic_train_size': args.train_size,
    'synthetic_eval_size': 1024,
    'num_epochs': args.epochs,
    'eval_every_epochs': 1.0,
    'log_every_steps': max(1, args.train_size // batch // 4),
    'checkpoint_every_steps': 10**6,
    'seed': args.seed,
    **overrides,
  }
  command = [
    sys.executable,
    '-m',
    'chexnet_jax.main',
    '--config',
    os.path.join(REPO, 'configs', 'cpu_smoke.py'),
    '--workdir',
    workdir,
  ]
  command += [f'--config.{k}={v}' for k, v in settings.items()]
  env = dict(
    os.environ,
    XLA_FLAGS=(f'--xla_force_host_platform_device_count={devices}'),
    PYTHONPATH=REPO,
    JAX_PLATFORMS='cpu',
  )
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if result.returncode:
    return {'name': name, 'failed': result.stderr.strip().splitlines()[-1:]}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  steps_per_epoch = args.train_size // batch
  evals = [r['val_mean_auroc'] for r in records if 'val_mean_auroc' in r]
  losses = [r['train_loss'] for r in records if 'train_loss' in r and r['step'] > steps_per_epoch]
  peak_lr = max(r['learning_rate'] for r in records if 'learning_rate' in r)
  return {
    'name': name,
    'batch': batch,
    'devices': devices,
    'rule': overrides.get('lr_scaling', '-'),
    'warmup': overrides.get('warmup_epochs', 0.0),
    'peak_lr': peak_lr,
    'final': evals[-1],
    'best': max(evals),
    'evals': evals,
    'max_loss_after_epoch1': max(losses) if losses else float('nan'),
    'seconds': seconds,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=8)
  parser.add_argument('--train_size', type=int, default=8192)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
    '--runs', default='all', help=f'comma-separated names of {list(RUNS)}, or all'
  )
  parser.add_argument('--json', help='also write the results here')
  args = parser.parse_args()
  names = list(RUNS) if args.runs == 'all' else args.runs.split(',')
  results = []
  with tempfile.TemporaryDirectory() as root:
    for name in names:
      results.append(run(name, args, root))
      print(json.dumps(results[-1]), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  base = next((r['final'] for r in results if r['name'] == 'b64' and 'final' in r), None)
  print(
    f'\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; '
    f'{args.epochs} epochs of {args.train_size} synthetic images, seed '
    f'{args.seed}\n'
  )
  print(
    '| run | global batch | devices | LR rule | warmup epochs | peak LR | '
    'val mean AUROC (final) | best | final - batch 64 | max train loss '
    'after epoch 1 | wall s |'
  )
  print('|' + ' --- |' * 11)
  for r in results:
    if 'failed' in r:
      print(f'| {r["name"]} | failed: {r["failed"]} |')
      continue
    delta = '' if base is None else f'{r["final"] - base:+.4f}'
    print(
      f'| {r["name"]} | {r["batch"]} | {r["devices"]} | {r["rule"]} | '
      f'{r["warmup"]:g} | {r["peak_lr"]:.2e} | {r["final"]:.4f} | '
      f'{r["best"]:.4f} | {delta} | {r["max_loss_after_epoch1"]:.4f} | '
      f'{r["seconds"]:.0f} |'
    )


if __name__ == '__main__':
  main()
