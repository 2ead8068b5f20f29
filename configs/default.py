"""Every configuration field, with its default. Other configs import this and override.

The defaults are CheXNet's recipe (Rajpurkar et al. 2017, "CheXNet", section 3 and
its 14-disease extension), each with its source; where we differ it says so, and
README.md tabulates them against the paper and the reference trainer.

Durations: set `num_epochs` (or `num_train_steps` > 0 to override it); -1 means "derive it".
`batch_size` is the GLOBAL batch (all processes, all devices).
"""

import ml_collections


# The default validation cut; input_pipeline.chestxray14 names datasets built
# with another one after it (e.g. 256px_val0.2_seed3).
VAL_FRACTION = 0.1
SPLIT_SEED = 0


def get_config():
  c = ml_collections.ConfigDict()

  # Data.
  c.dataset = 'chestxray14'  # 'chestxray14' (TFDS ArrayRecord), 'synthetic', or
  # the NAME of a dataset built from your own CSV
  # (python -m input_pipeline.build --csv ... --name NAME).
  c.data_dir = 'data/tfds'  # TFDS data_dir holding the built dataset.
  c.dataset_image_size = 224  # Side of the stored (pre-resized) records. 224 =
  # the model's: the builder scales each whole 1024 px
  # image to 224 once (CheXNet: "downscale the images
  # to 224x224"), so training reads it as is
  # (benchmarks/RESULTS.md has the input cost).
  c.image_size = 224  # Side of the model input (CheXNet: 224).
  c.augment = 'resize'  # CheXNet: the whole image (resized to image_size
  # if the records are larger) + random flip. Options:
  # 'random_resized_crop', 'random_crop', 'center_crop'.
  c.random_flip = True  # CheXNet: "random horizontal flipping".
  c.min_crop_area = 0.08  # Lower bound of random_resized_crop's area fraction.
  c.eval_preprocess = 'resize'  # CheXNet scores the whole image: 'resize' (the
  # whole record resized to image_size) or
  # 'center_crop' (its central image_size square).
  c.val_fraction = VAL_FRACTION  # Fraction of train_val PATIENTS cut out as validation;
  c.split_seed = SPLIT_SEED  # with split_seed, fixed when the dataset is built
  # (input_pipeline.build); checked when it is read.
  c.grain_workers = 0  # grain worker processes per host (0 = in-process).
  c.prefetch_buffer = 2  # Batches prefetched per worker.
  c.synthetic_train_size = 2048  # Synthetic split sizes (dataset='synthetic').
  c.synthetic_eval_size = 512

  # Model.
  c.model = 'densenet121'  # densenet121, densenet169, densenet201, tiny.
  c.num_classes = -1  # -1: the dataset's label count (NIH: 14). The label
  # names are the dataset's, recorded in the run's run.json.
  c.dtype = 'float32'  # Compute dtype: float32, bfloat16, float16.
  c.bn_sync = False  # True: BN statistics over the global batch.
  c.init_from = 'imagenet'  # CheXNet: ImageNet DenseNet121. 'imagenet'
  # downloads imagenet_weights_url once (verified,
  # cached); '' or 'none': from scratch; or a path
  # (.pth, .h5, .weights.h5, .keras); or a run
  # directory: fine-tune its best checkpoint (head
  # rows mapped by label name, new labels fresh).
  c.imagenet_weights_url = (  # torchvision's file; the hex in its name is the
    'https://download.pytorch.org/models/densenet121-a639ec97.pth'
  )  # sha256 prefix.
  c.weights_cache_dir = ''  # '' = $XDG_CACHE_HOME/chexnet_jax (~/.cache/...).

  # Optimisation.
  c.batch_size = 64  # Global batch. CheXNet: 16; the reference: 64 per GPU.
  c.eval_batch_size = 64  # Global eval batch.
  c.learning_rate = 1e-3  # CheXNet: Adam, initial LR 0.001; holds at
  c.lr_base_batch_size = 64  # this batch, scaled to batch_size by:
  c.lr_scaling = 'sqrt'  # 'none' | 'sqrt' | 'sqrt_adam' | 'linear'
  # (chexnet_jax/training/lr_scaling.py). sqrt: the rule derived
  # for Adam (Malladi et al. 2022); at batch 1024 it led
  # linear at every epoch until both matched batch 64
  # (benchmarks/LARGE_BATCH.md).
  c.b1 = 0.9  # CheXNet: "standard parameters" 0.9, 0.999.
  c.b2 = 0.999
  c.adam_eps = 1e-8  # PyTorch's default (Keras uses 1e-7).
  c.weight_decay = 0.0
  c.lr_schedule = 'plateau'  # CheXNet: LR /10 "each time the validation loss
  # plateaus after an epoch". Or 'warmup_cosine'.
  c.warmup_epochs = 1.0  # Linear warmup from lr * base / batch (lr_scaling.py);
  # a no-op at the base batch (64).
  c.plateau_factor = 0.1
  c.plateau_patience = 1  # Bad epochs tolerated before a cut (PyTorch's
  # meaning; the paper does not give its patience).
  c.pos_weight = 'none'  # CheXNet's 14-label loss: the unweighted BCE. Or
  # 'chexnet_paper' (w+ = N/(P+N), w- = P/(P+N)) or
  # 'negatives_over_positives' (PyTorch's N/P form);
  # chexnet_jax/model/losses.py.
  c.best_metric = 'val_loss'  # CheXNet: "pick the model with the lowest
  # validation loss". Or 'val_mean_auroc'.
  c.num_epochs = 10.0
  c.num_train_steps = -1  # > 0 overrides num_epochs.
  # XLA:GPU command buffers (CUDA graphs): the launch kinds captured. With
  # CONVOLUTION (not in XLA's default) DenseNet121's 1-GPU step is one graph: 1
  # host launch per step instead of 908 (benchmarks/results/compile_report.json);
  # on several GPUs the graphs end at each all-reduce. COLLECTIVES is opt-in
  # (append ',COLLECTIVES'): public reports of a ~30% slowdown (openxla/xla#35360),
  # a silent hang after hundreds of steps (marin-community/marin#5675) and a leak
  # on re-recording (openxla/xla#36487). '' = XLA's default. XLA parses the kinds
  # on CPU too (an unknown kind fails there) but acts on them only on GPUs. A kind
  # refused or a graph that fails to capture in the first steps is logged in one
  # line and the run goes on with XLA's default (train_step.StepWithFallback).
  c.gpu_command_buffers = (
    'FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONVOLUTION'
  )
  # True: Adam over all parameters as one flat vector (optax.flatten): a few
  # kernels per step instead of one per parameter. Changes the checkpoint's
  # optimizer-state layout, so a run resumes only with the setting it began with.
  c.fused_optimizer = False
  # True: in the train step, each dense layer's BN-ReLU-1x1 conv is one Pallas kernel
  # (Triton on GPUs, interpret mode on CPU) that also sums the next BN's moments, and its
  # input gradient another (chexnet_jax/model/fused_dense_layer.py); evaluation is not
  # fused. Opt-in and unmeasured on a GPU; the same parameters and, to float32 rounding,
  # the same numbers. bfloat16 on GPUs (compute capability 8.0+); float32 on CPU only.
  c.fused_dense_layer = False

  # Bookkeeping.
  c.seed = 0
  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.debug_nan_at_step = -1  # Tests: poison the loss of the step that
  # starts at this step count (logged as N+1).
  c.allow_changes = ''  # Resuming: comma-separated fields among batch_size,
  # dtype, image_size, dataset that may differ from the run's (refused
  # otherwise); every change made is logged and kept in config_history.jsonl.

  # Distributed (leave empty under Slurm: JAX detects it).
  c.coordinator_address = ''
  c.num_processes = -1
  c.process_id = -1
  c.heartbeat_timeout_seconds = 60
  # Step watchdog (train.py): a step that takes more than factor x the median of
  # the recent ones, and at least min_seconds, is a hung collective (a stopped
  # or stuck peer that the heartbeat does not catch): the process exits with
  # one sentence naming the step, and srun --kill-on-bad-exit ends the job.
  c.step_timeout_factor = 20.0
  c.step_timeout_min_seconds = 600.0  # 0: no watchdog.
  return c
