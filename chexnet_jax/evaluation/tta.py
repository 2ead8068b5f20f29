"""When test-time ten-crop is real: the conditions `evaluate --tta tencrop` checks.

Ten-crop (Krizhevsky et al. 2012; torchvision's TenCrop) scores the four corner
crops and the centre crop of each stored record, each image_size square at the
record's own scale, and their mirrors. That is the scale a model trained on crops
saw (augment random_crop, center_crop, or random_resized_crop, whose convention
it is: RandomResizedCrop(224) to train, Resize(256) + TenCrop(224) to test). It
needs records larger than the model input: on records of the input's size (the
default 224 px) the ten views are the whole image and its mirror five times
over, and under augment='resize' (the whole record shrunk to image_size) every
crop is at another scale than training. Both are refused, in one sentence.
"""

# Training augmentations that see image_size crops at the record's own scale.
from chexnet_jax import errors

CROP_AUGMENTS = ('random_crop', 'center_crop', 'random_resized_crop')


class TTAError(errors.UserValueError):
  """This run cannot be scored with the asked test-time augmentation."""


def check_tencrop(config):
  """Raises TTAError unless ten-crop gives 10 distinct views at the training scale."""
  record, size = config.dataset_image_size, config.image_size
  if record <= size:
    raise TTAError(
      f"--tta tencrop needs records larger than the model input, but this run's records are "
      f'{record} px and its model input {size} px, so the ten views would be the whole image '
      'and its mirror (--tta flip); build the dataset at a larger --image_size (256 px for a '
      '224 px model, as torchvision ten-crops) and train on it with '
      '--config.augment=random_crop or random_resized_crop.'
    )
  if config.augment not in CROP_AUGMENTS:
    raise TTAError(
      f"--tta tencrop scores {size} px crops at the records' own scale, but this run trained "
      f'on the whole {record} px record resized to {size} px (config.augment='
      f'{config.augment!r}), so every crop would be at another scale than training; use '
      '--tta flip, or train with --config.augment set to one of '
      f'{", ".join(CROP_AUGMENTS)}.'
    )
