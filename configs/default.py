"""Every configuration field, with its default. Other configs import this and override.

Durations: set `num_epochs` (or `num_train_steps` > 0 to override it); -1 means "derive it".
`batch_size` is the GLOBAL batch (all processes, all devices).
"""
import ml_collections

from input_pipeline import labels

# The default validation cut; input_pipeline.chestxray14 names datasets built
# with another one after it (e.g. 256px_val0.2_seed3).
VAL_FRACTION = 0.1
SPLIT_SEED = 0


def get_config():
  c = ml_collections.ConfigDict()

  # Data.
  c.dataset = 'chestxray14'          # 'chestxray14' (TFDS ArrayRecord) or 'synthetic'.
  c.data_dir = 'data/tfds'           # TFDS data_dir holding the built dataset.
  c.dataset_image_size = 256         # Side of the stored (pre-resized) records.
  c.image_size = 224                 # Side of the model input (crop of the stored image).
  c.augment = 'random_resized_crop'  # 'random_resized_crop', 'random_crop' or 'center_crop'.
  c.random_flip = True
  c.min_crop_area = 0.08             # Lower bound of random_resized_crop's area fraction.
  c.val_fraction = VAL_FRACTION      # Fraction of train_val PATIENTS cut out as validation;
  c.split_seed = SPLIT_SEED          # with split_seed, fixed when the dataset is built
                                     # (input_pipeline.build); checked when it is read.
  c.grain_workers = 0                # grain worker processes per host (0 = in-process).
  c.prefetch_buffer = 2              # Batches prefetched per worker.
  c.synthetic_train_size = 2048      # Synthetic split sizes (dataset='synthetic').
  c.synthetic_eval_size = 512

  # Model.
  c.model = 'densenet121'            # densenet121, densenet169, densenet201, tiny.
  c.num_classes = labels.NUM_CLASSES
  c.dtype = 'float32'                # Compute dtype: float32, bfloat16, float16.
  c.bn_sync = False                  # True: BN statistics over the global batch.
  c.init_from = ''                   # Weights to start from (.pth, .h5, .weights.h5).

  # Optimisation.
  c.batch_size = 64                  # Global batch.
  c.eval_batch_size = 64             # Global eval batch.
  c.learning_rate = 1e-3             # At `lr_base_batch_size`; scaled linearly with batch.
  c.lr_base_batch_size = 64
  c.b1 = 0.9
  c.b2 = 0.999
  c.adam_eps = 1e-8                  # PyTorch's default (Keras uses 1e-7).
  c.weight_decay = 0.0
  c.lr_schedule = 'plateau'          # 'plateau' (CheXNet) or 'warmup_cosine' (large batch).
  c.warmup_epochs = 0.0
  c.plateau_factor = 0.1
  c.plateau_patience = 1             # Bad epochs tolerated before a cut (PyTorch's meaning).
  c.pos_weight = False               # CheXNet's weighted BCE (per-label positive weights).
  c.num_epochs = 10.0
  c.num_train_steps = -1             # > 0 overrides num_epochs.

  # Bookkeeping.
  c.seed = 0
  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.debug_nan_at_step = -1           # Tests: poison the loss of the step that
                                     # starts at this step count (logged as N+1).

  # Distributed (leave empty under Slurm: JAX detects it).
  c.coordinator_address = ''
  c.num_processes = -1
  c.process_id = -1
  c.heartbeat_timeout_seconds = 60
  return c
