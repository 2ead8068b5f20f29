"""Which learning-rate rule keeps a global batch of 1024 as good as batch 64?

  python benchmarks/large_batch.py --phase tune --seeds 0 --results R.jsonl
  python benchmarks/large_batch.py --phase tune --lrs X --seeds 1,2 --results R.jsonl
  python benchmarks/large_batch.py --phase rules --base_lr X --seeds 0,1,2 --results R.jsonl
  python benchmarks/large_batch.py --table R.jsonl

Trains the tiny DenseNet of configs/cpu_smoke.py on its learnable synthetic data
with `python -m chexnet_jax.main`. Phase 'tune' sweeps Adam's rate at global batch
64 on 1 device (BASE_LRS) to find the base rate; phase 'rules' then trains global
batch 1024 on 16 simulated CPU devices (--xla_force_host_platform_device_count=16)
once per scaling rule of chexnet_jax/training/lr_scaling.py, from that base rate, each with
`--warmup_epochs` of warmup. 64 images per device in both, so BatchNorm sees
per-device batches of 64 as on 16 V100s. Every run sees the same images (same
epochs), uses the plateau schedule and is scored on the same validation images
with the same evaluation view (EVAL_PREPROCESS) after every epoch.

Each finished run is appended to the --results file at once (a rerun skips the
runs already there), and the table is printed from that file: per row the mean and
standard deviation over seeds of the final validation mean AUROC and its distance
from the best batch-64 row, the mean over epochs and the first epoch at TARGET
(learning speed), the peak rate and b2, the largest training loss after the first
epoch (stability) and wall time; then the per-epoch AUROC of each row.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
BASE_BATCH = 64
LARGE_BATCH = 1024
BASE_LRS = (5e-4, 1e-3, 2e-3, 4e-3)
RULES = ('sqrt', 'sqrt_adam', 'linear', 'none')
# One view for every row: the whole image, as the recipe trains and scores it.
AUGMENT = 'resize'
EVAL_PREPROCESS = 'resize'
IMAGE_SIZE = 32
EVAL_SIZE = 1024
# The task saturates (batch 64 reaches AUROC 1.0), so learning speed is scored too:
# the mean of the per-epoch AUROCs, and the first epoch that reaches TARGET.
TARGET = 0.99


def planned_runs(args):
  """[(name, global batch, devices, base LR, rule)] of the chosen phase."""
  if args.phase == 'tune':
    lrs = BASE_LRS if args.lrs == 'all' else [float(lr) for lr in args.lrs.split(',')]
    return [(f'b64_lr{lr:g}', BASE_BATCH, 1, lr, 'none') for lr in lrs]
  if args.base_lr is None:
    sys.exit('error: --phase rules needs --base_lr (the best rate of --phase tune).')
  rules = RULES if args.rules == 'all' else args.rules.split(',')
  return [
    (f'b1024_{rule}', LARGE_BATCH, LARGE_BATCH // BASE_BATCH, args.base_lr, rule) for rule in rules
  ]


def settings_of(args, batch, base_lr, rule, seed):
  return {
    'batch_size': batch,
    'eval_batch_size': EVAL_SIZE,
    'learning_rate': base_lr,
    'lr_base_batch_size': BASE_BATCH,
    'lr_scaling': rule,
    'warmup_epochs': args.warmup_epochs,
    'lr_schedule': 'plateau',
    'dataset_image_size': IMAGE_SIZE,
    'image_size': IMAGE_SIZE,
    'augment': AUGMENT,
    'eval_preprocess': EVAL_PREPROCESS,
    'synthetic_train_size': args.train_size,
    'synthetic_eval_size': EVAL_SIZE,
    'num_epochs': args.epochs,
    'eval_every_epochs': 1.0,
    'log_every_steps': max(1, args.train_size // batch // 4),
    'checkpoint_every_steps': 10**6,
    'seed': seed,
  }


def train(name, devices, settings, root):
  """Runs chexnet_jax.main once; its result record (or the error it ended with)."""
  workdir = os.path.join(root, f'{name}_seed{settings["seed"]}')
  command = [sys.executable, '-m', 'chexnet_jax.main', '--workdir', workdir]
  command += ['--config', os.path.join(REPO, 'configs', 'cpu_smoke.py')]
  command += [f'--config.{k}={v}' for k, v in settings.items()]
  env = dict(
    os.environ,
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    PYTHONPATH=REPO,
    JAX_PLATFORMS='cpu',
  )
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  record = {'name': name, 'devices': devices, 'settings': settings, 'seconds': seconds}
  if result.returncode:
    return {**record, 'failed': result.stderr.strip().splitlines()[-1:]}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  steps_per_epoch = settings['synthetic_train_size'] // settings['batch_size']
  evals = [r['val_mean_auroc'] for r in logged if 'val_mean_auroc' in r]
  losses = [r['train_loss'] for r in logged if 'train_loss' in r and r['step'] > steps_per_epoch]
  return {
    **record,
    'steps': max(r['step'] for r in logged if 'step' in r),
    'peak_lr': max(r['learning_rate'] for r in logged if 'learning_rate' in r),
    'evals': evals,
    'final': evals[-1],
    'curve_mean': sum(evals) / len(evals),
    'first_epoch_at_target': next((i + 1 for i, e in enumerate(evals) if e >= TARGET), None),
    'max_loss_after_epoch1': max(losses) if losses else float('nan'),
  }


def read_results(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_result(path, record):
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def run_phase(args):
  done = {(r['name'], r['settings']['seed']) for r in read_results(args.results) if 'final' in r}
  seeds = [int(seed) for seed in args.seeds.split(',')]
  once = args.first_seed_only.split(',')
  with tempfile.TemporaryDirectory() as root:
    for seed in seeds:
      for name, batch, devices, base_lr, rule in planned_runs(args):
        if (name, seed) in done or (rule in once and seed != seeds[0]):
          continue
        record = train(name, devices, settings_of(args, batch, base_lr, rule, seed), root)
        append_result(args.results, record)
        print(json.dumps(record), flush=True)


def adam_b2(settings):
  """b2 of a run: configs/default.py's 0.999, scaled under sqrt_adam (lr_scaling.py)."""
  from chexnet_jax.training import lr_scaling  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.update({k: v for k, v in settings.items() if k in config})
  return lr_scaling.adam_hyperparameters(config)['b2']


def _mean_sd(values):
  sd = statistics.stdev(values) if len(values) > 1 else float('nan')
  return statistics.mean(values), sd


def table(records):
  """Markdown table: one row per run name, mean +- sd over its seeds."""
  rows = {}
  for r in records:
    if 'final' in r:
      rows.setdefault(r['name'], []).append(r)
  base = max(
    (_mean_sd([r['final'] for r in runs])[0] for n, runs in rows.items() if n.startswith('b64')),
    default=None,
  )
  lines = [
    '| run | global batch | devices | base LR at 64 | LR rule | peak LR | b2 | steps | seeds '
    '| val mean AUROC, final (mean +- sd) | minus best batch 64 | mean over epochs (mean +- sd) '
    f'| first epoch >= {TARGET} (per seed) | max train loss after epoch 1 (worst seed) '
    '| wall s (mean) |',
    '|' + ' --- |' * 15,
  ]
  for name, runs in rows.items():
    runs.sort(key=lambda r: r['settings']['seed'])
    s = runs[0]['settings']
    mean, sd = _mean_sd([r['final'] for r in runs])
    curve, curve_sd = _mean_sd([r['curve_mean'] for r in runs])
    first = ' '.join(str(r['first_epoch_at_target'] or '-') for r in runs)
    delta = '' if base is None else f'{mean - base:+.3f}'
    lines.append(
      f'| {name} | {s["batch_size"]} | {runs[0]["devices"]} | {s["learning_rate"]:g} | '
      f'{s["lr_scaling"]} | {runs[0]["peak_lr"]:.2e} | '
      f'{adam_b2(s):g} | {runs[0]["steps"]} | '
      f'{len(runs)} | {mean:.3f} +- {sd:.3f} | {delta} | {curve:.3f} +- {curve_sd:.3f} | '
      f'{first} | '
      f'{max(r["max_loss_after_epoch1"] for r in runs):.3f} | '
      f'{statistics.mean(r["seconds"] for r in runs):.0f} |'
    )
  return '\n'.join(lines)


def curves(records):
  """Markdown table: validation mean AUROC after each epoch, mean over seeds."""
  rows = {}
  for r in records:
    if 'final' in r:
      rows.setdefault(r['name'], []).append(r['evals'])
  epochs = max(len(e) for runs in rows.values() for e in runs)
  lines = ['| run | ' + ' | '.join(f'epoch {i + 1}' for i in range(epochs)) + ' |']
  lines.append('|' + ' --- |' * (epochs + 1))
  for name, runs in rows.items():
    means = [statistics.mean(e[i] for e in runs) for i in range(epochs)]
    lines.append(f'| {name} | ' + ' | '.join(f'{m:.3f}' for m in means) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--phase', choices=('tune', 'rules'))
  parser.add_argument('--base_lr', type=float, help="phase 'rules': Adam's rate at batch 64")
  parser.add_argument('--epochs', type=int, default=8)
  parser.add_argument('--train_size', type=int, default=12288)
  parser.add_argument('--warmup_epochs', type=float, default=1.0)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--lrs', default='all', help=f"phase 'tune': some of {BASE_LRS}, or all")
  parser.add_argument('--rules', default='all', help=f"phase 'rules': some of {RULES}, or all")
  parser.add_argument(
    '--first_seed_only',
    default='none',
    help="rules run on the first seed only (default: the reference's fixed rate, so the "
    'compute budget goes to the rules that decide)',
  )
  parser.add_argument('--results', default='large_batch.jsonl', help='JSON lines, appended')
  parser.add_argument('--table', help='only print the table of this results file')
  args = parser.parse_args()
  if args.phase:
    run_phase(args)
  records = read_results(args.table or args.results)
  print(
    f'\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
    f'python {platform.python_version()}; augment={AUGMENT}, '
    f'eval_preprocess={EVAL_PREPROCESS}, {IMAGE_SIZE} px\n'
  )
  print(table(records))
  print()
  print(curves(records))


if __name__ == '__main__':
  main()
