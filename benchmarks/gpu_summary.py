"""Summarises a benchmarks/device_check.sh results folder.

    python benchmarks/gpu_summary.py RESULTS_DIR [--command "..."] [--out FILE]

Writes RESULTS_DIR/gpu_summary.json (one row per measured shape; null where a
number was not measured) and RESULTS_DIR/summary.md, and prints the table.
"""

import argparse
import json
import pathlib
import statistics

GIB = 2**30


def load(path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


def images_per_s(result):
  return result.get('images_per_s')


def busy_ms(result):
  """The profiled device time per step, or None where the run was not profiled."""
  profile = result.get('profile') or {}
  return 1e3 * profile['busy_s_per_step'] if 'busy_s_per_step' in profile else None


def end_to_end(res):
  """(median images/s, median data wait ms) of the e2e run's logged intervals.

  The first interval holds the compilation, so it is left out.
  """
  path = res / 'e2e-metrics.jsonl'
  if not path.exists():
    return None, None
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  rows = [r for r in rows if 'images_per_second' in r][1:]
  if not rows:
    return None, None
  return (
    statistics.median(r['images_per_second'] for r in rows),
    statistics.median(r['data_wait_ms'] for r in rows),
  )


def e2e_shape(res):
  config = load(res / 'e2e-config.json')
  if not config:
    return None
  return (config['image_size'], config['batch_size'], config['dtype'])


def shape_order(path):
  _, px, batch, dtype = path.stem.split('-')
  return (dtype != 'bfloat16', int(batch), int(px))


def rows(res, command):
  e2e_rate, _ = end_to_end(res)
  e2e_at = e2e_shape(res)
  out = []
  for path in sorted(res.glob('jax-*.json'), key=shape_order):
    _, px, batch, dtype = path.stem.split('-')
    key = f'{px}-{batch}-{dtype}'
    jax_r = load(path)
    eager, compiled = (load(res / f'torch-{m}-{key}.json') for m in ('eager', 'compile'))
    mem = jax_r.get('peak_memory_bytes')
    out.append(
      {
        'card': jax_r.get('device_kind'),
        'px': int(px),
        'batch': int(batch),
        'dtype': dtype,
        'jax_images_per_s': images_per_s(jax_r),
        'jax_in_flight_images_per_s': jax_r.get('in_flight_images_per_s'),
        'device_busy_ms_per_step': busy_ms(jax_r),
        'torch_eager_images_per_s': images_per_s(eager),
        'torch_compile_images_per_s': images_per_s(compiled),
        'end_to_end_images_per_s': (e2e_rate if e2e_at == (int(px), int(batch), dtype) else None),
        'mfu': jax_r.get('mfu'),
        'peak_memory_gib': mem / GIB if mem else None,
        'torch_eager_peak_memory_gib': (
          eager['peak_memory_bytes'] / GIB if eager.get('peak_memory_bytes') else None
        ),
        'compile_s': jax_r.get('compile_s'),
        'step_time_p10_p90_s': (
          [jax_r['step_time_p10_s'], jax_r['step_time_p90_s']]
          if 'step_time_p10_s' in jax_r
          else None
        ),
        'status': {
          'jax': jax_r.get('status', 'ok' if jax_r else 'not run'),
          'torch_eager': eager.get('status', 'not run'),
          'torch_compile': compiled.get('status', 'not run'),
        },
        'command': command,
      }
    )
  return out


def fmt(value, spec='.0f'):
  return 'n/a' if value is None else format(value, spec)


def ratio(a, b):
  return fmt(a / b, '.2f') if (a and b) else 'n/a'


def table(summary, res):
  wait = end_to_end(res)[1]
  lines = [
    '| card | px | batch | dtype | JAX img/s | torch eager | torch.compile | '
    'JAX/eager | JAX/compile | end to end | MFU | JAX peak GiB | compile s |',
    '| --- ' * 13 + '|',
  ]
  for r in summary:
    j = r['jax_images_per_s']
    lines.append(
      f'| {r["card"]} | {r["px"]} | {r["batch"]} | {r["dtype"]} | {fmt(j)} | '
      f'{fmt(r["torch_eager_images_per_s"])} | {fmt(r["torch_compile_images_per_s"])} | '
      f'{ratio(j, r["torch_eager_images_per_s"])} | '
      f'{ratio(j, r["torch_compile_images_per_s"])} | '
      f'{fmt(r["end_to_end_images_per_s"])} | {fmt(r["mfu"] and 100 * r["mfu"], ".1f")}% | '
      f'{fmt(r["peak_memory_gib"], ".1f")} | {fmt(r["compile_s"], ".0f")} |'
    )
  if wait is not None:
    lines.append(f'\nEnd to end: median data wait {wait:.1f} ms per step.')
  tests = res / 'tests.txt'
  if tests.exists():
    lines.append(f'GPU tests: {tests.read_text().strip()}')
  in_flight = [r for r in summary if r['jax_in_flight_images_per_s']]
  if in_flight:
    lines.append(
      '\nJAX with steps in flight (as the trainer runs them), images/s: '
      + ', '.join(
        f'batch {r["batch"]}: {fmt(r["jax_in_flight_images_per_s"])}'
        + (
          f' (device busy {r["device_busy_ms_per_step"]:.1f} ms per step)'
          if r['device_busy_ms_per_step']
          else ''
        )
        for r in in_flight
      )
    )
  tune = sorted(res.glob('tune-*.json'))
  if tune:
    lines.append(
      '\nChanges against the default (same shape, same call), images/s synced / in flight: '
      + ', '.join(f'{p.stem}: {variant(load(p))}' for p in tune)
    )
  fell_back = [
    f'{p.stem} ({load(p)["command_buffer_fallback"]})'
    for p in sorted(res.glob('*.json'))
    if isinstance(load(p), dict) and load(p).get('command_buffer_fallback')
  ]
  if fell_back:
    lines.append(
      "\nCommand buffers failed, the run went on with XLA's default kinds: " + '; '.join(fell_back)
    )
  return '\n'.join(lines)


def variant(result):
  text = f'{fmt(images_per_s(result))} / {fmt(result.get("in_flight_images_per_s"))}'
  busy = busy_ms(result)
  return text + (f' (device busy {busy:.1f} ms per step)' if busy else '')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('results_dir', type=pathlib.Path)
  parser.add_argument('--command', default='bash benchmarks/device_check.sh')
  args = parser.parse_args()
  res = args.results_dir
  summary = rows(res, args.command)
  (res / 'gpu_summary.json').write_text(json.dumps(summary, indent=1) + '\n')
  text = table(summary, res)
  (res / 'summary.md').write_text(text + '\n')
  print(text)


if __name__ == '__main__':
  main()
