"""Multi-node behaviour on a real Slurm: two emulated nodes on this machine
(slurm/local_cluster.sh), 2 tasks each = 4 JAX processes on CPU (gloo).

Needs root (apt-get, slurmd). Without it, or without a way to install Slurm,
the module is skipped, except under CI (env CI set), where that is a failure.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slurm

REPO = pathlib.Path(__file__).resolve().parents[2]
CLUSTER = REPO / 'slurm' / 'local_cluster.sh'
CPU_SCRIPT = 'slurm/train_cpu_local.sbatch'
TWO_BY_TWO = ('--nodes=2', '--ntasks-per-node=2')  # 4 processes on 2 nodes.
STEPS = 24  # 1.5 epochs of cpu_smoke (16 steps per epoch).
EXACT_STEPS = 8  # Steps compared at float32 tolerance (see below).
HEARTBEAT_S = 5  # config.heartbeat_timeout_seconds in the peer-failure test.
# Every run trains STEPS steps, logs every step, checkpoints every 8 and
# evaluates only at the end (another evaluation is another compile on 2 busy
# cores). Adam's eps: with 1e-8 a gradient that is zero up to rounding gets a
# full-size update of random sign, turning rounding differences into lr-sized
# ones. The fields the tests rely on are pinned here, not taken from cpu_smoke.
TRAIN_ARGS = (
  f'--config.num_train_steps={STEPS}',
  '--config.log_every_steps=1',
  '--config.eval_every_epochs=100',
  '--config.adam_eps=1e-3',
  '--config.checkpoint_every_steps=8',
  '--config.keep_checkpoints=3',
  '--config.learning_rate=1e-3',
)
FINAL_STATES = (
  'COMPLETED',
  'FAILED',
  'CANCELLED',
  'TIMEOUT',
  'NODE_FAIL',
  'OUT_OF_MEMORY',
  'BOOT_FAIL',
  'DEADLINE',
  'PREEMPTED',
)


def _run(cmd, **kwargs):
  return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


class Cluster:
  """Submits jobs to the local cluster with a test environment."""

  def __init__(self, tmp):
    self.tmp = tmp
    env_file = tmp / 'chexnet_env.sh'
    # Replaces slurm/env.sh for test jobs: this interpreter, and a compilation
    # cache shared by all jobs (the tiny model compiles once, not per job).
    env_file.write_text(
      f'export PATH="{pathlib.Path(sys.executable).parent}:$PATH"\n'
      f'export JAX_COMPILATION_CACHE_DIR="{tmp / "jax_cache"}"\n'
      'export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5\n'
    )
    self.env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    self.env.update(CHEXNET_ENV=str(env_file), JAX_PLATFORMS='cpu', SLURM_CONF=_cluster_conf())

  def sbatch(self, script, *args, wait=False, env=None, timeout=300, topology=()):
    """Submits from the repository root; returns the job id. `topology`:
    sbatch options (the CPU script takes its shape from the command line)."""
    cmd = ['sbatch', '--parsable', f'--output={self.tmp}/%x-%j.out', *topology]
    cmd += ['--wait'] if wait else []
    result = _run(
      cmd + [str(script), *args], cwd=REPO, timeout=timeout, env=dict(self.env, **(env or {}))
    )
    match = re.match(r'(\d+)', result.stdout)
    assert match, f'sbatch failed: {result.stdout}{result.stderr}'
    return match.group(1)

  def job(self, job_id):
    """scontrol's fields of the job (kept MinJobAge=300 s after it ends)."""
    out = _run(['scontrol', '-o', 'show', 'job', job_id], env=self.env).stdout
    return dict(re.findall(r'(\w+)=(\S*)', out))

  def wait(self, job_id, timeout, until=FINAL_STATES):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      job = self.job(job_id)
      if job.get('JobState') in until:
        return job
      time.sleep(0.5)
    pytest.fail(
      f'job {job_id} still {self.job(job_id).get("JobState")} '
      f'after {timeout}s; log:\n{self.log(job_id)[-3000:]}'
    )

  def log(self, job_id):
    paths = list(self.tmp.glob(f'*-{job_id}.out'))
    return paths[0].read_text() if paths else ''


def _cluster_conf():
  return _run([str(CLUSTER), 'env']).stdout.split('=', 1)[1].strip()


def _unavailable(reason):
  if os.environ.get('CI'):
    pytest.fail(f'CI is set, so the Slurm tests must run, but: {reason}')
  pytest.skip(reason)


@pytest.fixture(scope='module')
def cluster():
  if os.geteuid() != 0:
    _unavailable('the local Slurm cluster needs root (apt-get, slurmd)')
  was_running = _run([str(CLUSTER), 'status']).returncode == 0
  started = _run([str(CLUSTER), 'start'], timeout=600)
  if started.returncode != 0:
    _unavailable(f'slurm/local_cluster.sh start failed:\n{started.stderr[-2000:]}')
  # Not pytest's tmp_path: other pytest sessions of the same user prune old
  # basetemps, which would delete workdirs under running jobs.
  tmp = pathlib.Path(tempfile.mkdtemp(prefix='chexnet-slurm-tests-'))
  yield Cluster(tmp)
  if not os.environ.get('CHEXNET_KEEP_TEST_RUNS'):
    shutil.rmtree(tmp, ignore_errors=True)
  if not was_running:  # Leave a cluster someone else started alone.
    _run([str(CLUSTER), 'stop'], timeout=120)


# ------------------------------------------------------------- JAX on Slurm --

SUM_PROGRAM = r"""
import os
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from chexnet_jax.runtime import distributed
from configs import default

distributed.initialize(default.get_config())  # No addresses: JAX reads Slurm's.
mesh = Mesh(np.array(jax.devices()), ('data',))
local = np.full(jax.local_device_count(), jax.process_index() + 1., np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print(f'process {jax.process_index()}/{jax.process_count()} on '
      f"{os.environ['SLURMD_NODENAME']} sum {float(total)}", flush=True)
"""


def test_jax_distributed_on_2_nodes_x_2_tasks(cluster):
  program, script = cluster.tmp / 'sum.py', cluster.tmp / 'sum.sbatch'
  program.write_text(SUM_PROGRAM)
  script.write_text(
    '#!/bin/bash\n#SBATCH --job-name=sum --nodes=2 --ntasks-per-node=2 '
    '--time=5\nsource "$CHEXNET_ENV"\n'
    f'srun python -c "$(cat {program})"\n'
  )
  job_id = cluster.sbatch(script, wait=True, timeout=180)
  log = cluster.log(job_id)
  lines = re.findall(r'process (\d)/4 on (node\d) sum (\S+)', log)
  assert len(lines) == 4, log
  assert {p for p, _, _ in lines} == {'0', '1', '2', '3'}, log
  assert {node for _, node, _ in lines} == {'node1', 'node2'}, log
  assert {s for _, _, s in lines} == {'10.0'}, log  # 1 + 2 + 3 + 4.


# ------------------------------------------------------------ training runs --

# Trains in one process with 4 CPU devices on exactly the global batches that
# 4 processes build: each step concatenates the 4 per-process batches in
# process order (the order make_array_from_process_local_data lays them out).
REFERENCE_PROGRAM = r"""
import json, sys
import numpy as np
from absl import logging
from input_pipeline import pipeline
from chexnet_jax.training import train
from configs import cpu_smoke

PROCESSES = 4
make_iterator, steps_per_epoch = (pipeline.create_train_iterator,
                                  pipeline.train_steps_per_epoch)

class ConcatenatedIterator:
  def __init__(self, config):
    self.parts = [make_iterator(config, process_index=i,
                                process_count=PROCESSES)
                  for i in range(PROCESSES)]
  def __iter__(self):
    return self
  def __next__(self):
    batches = [next(part) for part in self.parts]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  def get_state(self):  # bytes: grain's checkpoint handler for iterators.
    return json.dumps([part.get_state() for part in self.parts]).encode()
  def set_state(self, state):
    for part, s in zip(self.parts, json.loads(state)):
      part.set_state(s)

pipeline.create_train_iterator = (
    lambda config, **_: ConcatenatedIterator(config))
pipeline.train_steps_per_epoch = (
    lambda config, n, _: steps_per_epoch(config, n, PROCESSES))
logging.set_verbosity(logging.WARNING)
config = cpu_smoke.get_config()
for arg in sys.argv[2:]:
  key, value = arg[len('--config.'):].split('=')
  config[key] = type(config[key])(value)
train.train_and_evaluate(config, sys.argv[1])
"""


def _losses(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  return {r['step']: r['train_loss'] for r in records if 'train_loss' in r}


def _params(workdir, step=STEPS):
  from chexnet_jax.run import run_reader  # Lazy: only these tests need orbax.
  import jax

  run = run_reader.load_run(str(workdir), step)
  return jax.tree.map(np.asarray, jax.device_get(run.variables))


def _assert_trees_close(a, b, rtol, atol):
  import jax

  paths_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree.leaves(b)
  assert len(paths_a) == len(leaves_b)
  for (path, x), y in zip(paths_a, leaves_b):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def four_process_run(cluster):
  """The CPU sbatch script, uninterrupted, and the 1-process reference run
  (started first; both share the 2 cores). Returns both workdirs + the log."""
  ours, reference = cluster.tmp / 'four', cluster.tmp / 'reference'
  env = {k: v for k, v in cluster.env.items() if not k.startswith('SLURM')}
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=4', PYTHONPATH=str(REPO))
  ref = subprocess.Popen(
    [sys.executable, '-c', REFERENCE_PROGRAM, str(reference), *TRAIN_ARGS],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    job_id = cluster.sbatch(
      CPU_SCRIPT, *TRAIN_ARGS, wait=True, env={'WORKDIR': str(ours)}, topology=TWO_BY_TWO
    )
    ref_out = ref.communicate(timeout=300)[0]
  finally:
    ref.kill()
  assert ref.returncode == 0, ref_out[-3000:]
  log = cluster.log(job_id)
  assert cluster.job(job_id)['JobState'] == 'COMPLETED', log[-3000:]
  return ours, reference, log


def test_cpu_sbatch_script_runs_4_processes_on_2_nodes(four_process_run):
  _, _, log = four_process_run
  assert '2 node(s) [node[1-2]], 4 task(s)' in log, log[-3000:]
  assert 'Topology: 4 processes, 1 local / 4 global cpu devices' in log, log[-3000:]
  assert f'step {STEPS}/{STEPS}' in log


def test_4_processes_train_like_1_process_with_4_devices(four_process_run):
  ours, reference, _ = four_process_run
  losses, expected = _losses(ours), _losses(reference)
  assert sorted(losses) == sorted(expected) == list(range(1, STEPS + 1))
  exact = range(1, EXACT_STEPS + 1)
  np.testing.assert_allclose([losses[s] for s in exact], [expected[s] for s in exact], rtol=1e-5)
  # atol 1e-4: BN's batch variance is E[x^2] - E[x]^2 in float32, which amplifies the
  # all-reduce's rounding (below) in the running statistics of small-valued channels
  # (seen: 7e-5 on a running mean of -0.037 after 8 steps).
  _assert_trees_close(
    _params(ours, EXACT_STEPS), _params(reference, EXACT_STEPS), rtol=1e-4, atol=1e-4
  )
  # The gradient all-reduce adds in another order across processes (gloo) than
  # within one; the ~1e-7 differences grow with every step (ReLU/max-pool
  # decisions flip), to ~1e-4 in the loss by step 24. Still no drift apart:
  np.testing.assert_allclose(
    [losses[s] for s in range(1, STEPS + 1)], [expected[s] for s in range(1, STEPS + 1)], rtol=1e-3
  )


def test_every_training_example_of_an_epoch_is_read_by_one_process():
  from input_pipeline import pipeline
  from configs import cpu_smoke

  config = cpu_smoke.get_config()
  n = config.synthetic_train_size
  steps = pipeline.train_steps_per_epoch(config, n, 4)
  seen = []
  for process in range(4):
    it = pipeline.create_train_iterator(config, process_index=process, process_count=4)
    mine = np.concatenate([next(it)['index'] for _ in range(steps)])
    seen.append(set(mine.tolist()))
    assert len(seen[-1]) == len(mine)  # No example twice within a process.
  for i in range(4):
    for j in range(i):
      assert not seen[i] & seen[j], (i, j)
  # Only the remainder that cannot fill a batch on every process is dropped.
  assert len(set().union(*seen)) == steps * config.batch_size > n - 4 * 8


def _wait_for_step(cluster, job_id, workdir, step, timeout=240):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if (workdir / 'metrics.jsonl').exists() and max(_losses(workdir), default=0) >= step:
      return
    state = cluster.job(job_id).get('JobState')
    assert state in ('PENDING', 'RUNNING', 'CONFIGURING'), (state, cluster.log(job_id)[-3000:])
    time.sleep(0.2)
  pytest.fail(
    f'job {job_id} did not reach step {step} in {timeout}s:\n{cluster.log(job_id)[-3000:]}'
  )


def _wait_for_checkpoint(path, timeout=120):
  """Until orbax has renamed the step's folder into place (its save is complete)."""
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f'{path} was not saved within {timeout} s'
    time.sleep(0.1)


def test_sigterm_checkpoints_requeues_and_finishes_like_uninterrupted(cluster, four_process_run):
  workdir = cluster.tmp / 'preempted'
  job_id = cluster.sbatch(
    CPU_SCRIPT, *TRAIN_ARGS, env={'WORKDIR': str(workdir)}, topology=TWO_BY_TWO
  )
  _wait_for_step(cluster, job_id, workdir, 2)
  # What Slurm does --signal=TERM@120 before the time limit, or on preemption.
  _run(['scancel', '--signal=TERM', job_id], env=cluster.env, check=True)
  # The requeued job restarts once its old credential expires (AuthInfo
  # cred_expire, 10 s on the local cluster) and a scheduling pass (2 s) starts it.
  job = cluster.wait(job_id, timeout=300, until=('COMPLETED', 'FAILED'))
  log = cluster.log(job_id)
  assert job['JobState'] == 'COMPLETED' and job['Restarts'] == '1', log[-4000:]
  saved = re.search(r'Preempted: saved step (\d+)', log)
  assert saved and 2 <= int(saved.group(1)) < STEPS, log[-4000:]
  assert f'requeueing job {job_id}' in log and 'restart 1:' in log
  assert f'Resuming from checkpoint step {saved.group(1)}' in log, log[-4000:]
  uninterrupted, _, _ = four_process_run
  # Same process count, same data stream: the same numbers.
  _assert_trees_close(_params(workdir), _params(uninterrupted), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
    [_losses(workdir)[s] for s in range(1, STEPS + 1)],
    [_losses(uninterrupted)[s] for s in range(1, STEPS + 1)],
    rtol=1e-6,
  )


def _task_pid(workdir, procid):
  """PID of the training task with SLURM_PROCID=procid writing to workdir."""
  for proc in pathlib.Path('/proc').iterdir():
    try:
      cmdline = (proc / 'cmdline').read_bytes().split(b'\0')
      environ = (proc / 'environ').read_bytes().split(b'\0')
    except (OSError, ValueError):
      continue
    if (
      b'chexnet_jax.main' in cmdline
      and str(workdir).encode() in cmdline
      and f'SLURM_PROCID={procid}'.encode() in environ
    ):
      return int(proc.name)
  return None


def test_dead_peer_stops_the_others_and_resubmission_resumes(cluster):
  workdir = cluster.tmp / 'peer_failure'
  args = (*TRAIN_ARGS, f'--config.heartbeat_timeout_seconds={HEARTBEAT_S}')
  job_id = cluster.sbatch(CPU_SCRIPT, *args, env={'WORKDIR': str(workdir)}, topology=TWO_BY_TWO)
  _wait_for_step(cluster, job_id, workdir, 9)
  _wait_for_checkpoint(workdir / 'checkpoints' / '8')  # Saved asynchronously: finalised.
  pid = _task_pid(workdir, 2)
  assert pid, 'task 2 not found'
  os.kill(pid, signal.SIGKILL)
  killed = time.monotonic()
  job = cluster.wait(job_id, timeout=120)
  elapsed = time.monotonic() - killed
  log = cluster.log(job_id)
  assert job['JobState'] == 'FAILED', log[-3000:]
  # The heartbeat bound, plus the survivors' abort and Slurm's bookkeeping.
  assert elapsed < HEARTBEAT_S + 25, (elapsed, log[-3000:])
  # Resubmitting the same script with the same workdir resumes.
  job_id = cluster.sbatch(
    CPU_SCRIPT, *args, wait=True, env={'WORKDIR': str(workdir)}, topology=TWO_BY_TWO
  )
  log = cluster.log(job_id)
  assert re.search(r'Resuming from checkpoint step (8|16)', log), log[-3000:]
  assert cluster.job(job_id)['JobState'] == 'COMPLETED', log[-3000:]
  assert max(_losses(workdir)) == STEPS


EVAL_SCRIPT = """#!/bin/bash
#SBATCH --job-name=eval124 --nodes=2 --ntasks-per-node=2 --time=10
source "$CHEXNET_ENV"
for n in 1 2 4; do
  srun --nodes=$(( n > 1 ? 2 : 1 )) --ntasks=$n python -m chexnet_jax.evaluate \\
    --workdir {workdir} --checkpoint latest --split test --bootstrap 10 \\
    --gallery 0 || exit 1
  cp {workdir}/eval/test/metrics.json {out}/metrics-$n.json
done
"""


def test_evaluation_under_1_2_4_processes_gives_the_same_aurocs(cluster, four_process_run):
  workdir = four_process_run[0]
  script = cluster.tmp / 'eval124.sbatch'
  script.write_text(EVAL_SCRIPT.format(workdir=workdir, out=cluster.tmp))
  job_id = cluster.sbatch(script, wait=True)
  assert cluster.job(job_id)['JobState'] == 'COMPLETED', cluster.log(job_id)[-3000:]
  reports = [json.loads((cluster.tmp / f'metrics-{n}.json').read_text()) for n in (1, 2, 4)]
  for report in reports:
    assert report['num_examples'] == 128  # Every test image once, no padding.
    for name, row in report['per_label'].items():
      assert row['auroc'] == pytest.approx(reports[0]['per_label'][name]['auroc'], abs=1e-6), name
    assert report['mean_auroc'] == pytest.approx(reports[0]['mean_auroc'], abs=1e-6)


def test_every_srun_kills_the_job_when_a_task_fails():
  """--kill-on-bad-exit=1: a hung or stopped task cannot keep a failed job
  RUNNING until its time limit once the others have exited."""
  scripts = [*sorted((REPO / 'slurm').glob('*.sbatch')), REPO / 'slurm' / 'job.sh']
  lines = [
    (p.name, line)
    for p in scripts
    for line in p.read_text().splitlines()
    if re.match(r'\s*srun\b', line)
  ]
  assert len(lines) >= 3
  for name, line in lines:
    assert '--kill-on-bad-exit=1' in line, (name, line)
  local = (REPO / CPU_SCRIPT).read_text()
  assert not re.search(r'#SBATCH --(nodes|ntasks)', local)  # From the command line.


def test_requeue_exit_code_matches_the_trainer():
  from chexnet_jax.training import train

  job_sh = (REPO / 'slurm' / 'job.sh').read_text()
  assert f'CHEXNET_PREEMPTED_EXIT_CODE={train.PREEMPTED_EXIT_CODE}' in job_sh
