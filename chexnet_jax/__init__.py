"""chexnet_jax: CheXNet's DenseNet121 on chest X-rays, from one GPU to many Slurm nodes.

The modules here are the commands a user types (`python -m chexnet_jax.main |
evaluate | predict | score | benchmark | import_weights | export`), thin: flags,
one `UserError` catch, then a call into the subpackages below, which are layered bottom-up:

  errors       the one error family; imports nothing of the project
  runtime/     processes, devices, logging: how a job runs
  model/       the network, its inputs and outputs, pretrained weights
  run/         a run directory on disk: lock, config, checkpoints, reading one
  evaluation/  scoring a split: predictions, metrics, calibration, CAMs
  report/      what an evaluation writes: files, figures, the HTML page
  training/    the loop, its state, step, learning rate and config checks

Each may import `errors`, `configs`, `input_pipeline` and the layers listed above
it; tests/unit/test_layers.py holds the order and fails on an arrow up.
"""
