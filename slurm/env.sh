# ============================================================================
# THE ONE PLACE where the sbatch scripts set up software (modules, venv).
# Edit it for your site, or point CHEXNET_ENV at your own file, which is then
# sourced instead of this one:
#   CHEXNET_ENV=$HOME/chexnet_env.sh sbatch slurm/train_v100x16.sbatch
# (sbatch passes the submitting shell's environment to the job.)
# ============================================================================

# Site modules, if your cluster uses them, e.g.:
#   module load cuda/12.4 cudnn/9
# Not needed with pip's jax[cuda12], which brings its own CUDA libraries.

# The virtual environment with chexnet_jax installed (pip install -e '.[cuda12]').
CHEXNET_VENV="${CHEXNET_VENV:-$PWD/.venv}"
if [[ ! -x "$CHEXNET_VENV/bin/python" ]]; then
  echo "error: CHEXNET_VENV=$CHEXNET_VENV has no bin/python. Fix: create it" \
    "(python -m venv .venv && .venv/bin/pip install -e '.[cuda12]'), export" \
    "CHEXNET_VENV=/path/to/venv, or edit slurm/env.sh / set CHEXNET_ENV." >&2
  exit 1
fi
source "$CHEXNET_VENV/bin/activate"
