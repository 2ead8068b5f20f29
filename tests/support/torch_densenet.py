"""An independent PyTorch DenseNet with torchvision's module names and layout.

torchvision itself is not importable here; this is benchmarks/torch_reference.py's
stand-in DenseNet121 (same layers), named as torchvision's `densenet121` names them
('features.denseblock1.denselayer1.norm1.weight', 'classifier.weight', ...), so that
a torchvision state dict loads into it with `load_state_dict(..., strict=True)`.
Used as the reference forward for imported and exported weights.
"""

import collections

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class _DenseLayer(nn.Module):
  def __init__(self, in_ch, growth, bn_size):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(in_ch)
    self.relu1 = nn.ReLU()
    self.conv1 = nn.Conv2d(in_ch, bn_size * growth, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(bn_size * growth)
    self.relu2 = nn.ReLU()
    self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

  def forward(self, x):
    y = self.conv1(self.relu1(self.norm1(x)))
    return torch.cat([x, self.conv2(self.relu2(self.norm2(y)))], 1)


class _DenseBlock(nn.ModuleDict):
  def __init__(self, layers, in_ch, growth, bn_size):
    super().__init__()
    for i in range(layers):
      self.add_module(f'denselayer{i + 1}', _DenseLayer(in_ch + i * growth, growth, bn_size))

  def forward(self, x):
    for layer in self.values():
      x = layer(x)
    return x


class _Transition(nn.Sequential):
  def __init__(self, in_ch, out_ch):
    super().__init__()
    self.add_module('norm', nn.BatchNorm2d(in_ch))
    self.add_module('relu', nn.ReLU())
    self.add_module('conv', nn.Conv2d(in_ch, out_ch, 1, bias=False))
    self.add_module('pool', nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
  """torchvision.models.DenseNet's module tree (densenet121 by default)."""

  def __init__(self, num_classes=14, blocks=(6, 12, 24, 16), growth=32, stem=64, bn_size=4):
    super().__init__()
    self.features = nn.Sequential(
      collections.OrderedDict(
        [
          ('conv0', nn.Conv2d(3, stem, 7, 2, 3, bias=False)),
          ('norm0', nn.BatchNorm2d(stem)),
          ('relu0', nn.ReLU()),
          ('pool0', nn.MaxPool2d(3, 2, 1)),
        ]
      )
    )
    ch = stem
    for i, n in enumerate(blocks):
      self.features.add_module(f'denseblock{i + 1}', _DenseBlock(n, ch, growth, bn_size))
      ch += n * growth
      if i != len(blocks) - 1:
        self.features.add_module(f'transition{i + 1}', _Transition(ch, ch // 2))
        ch //= 2
    self.features.add_module('norm5', nn.BatchNorm2d(ch))
    self.classifier = nn.Linear(ch, num_classes)

  def forward(self, x):
    x = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)
    return self.classifier(x)


def randomize(model, seed):
  """Random weights and BN statistics that keep activations in range over 121 layers."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.normal_(0, (2 / fan_in) ** 0.5, generator=generator)
      elif isinstance(module, nn.BatchNorm2d):
        c = module.num_features
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.normal_(0, 0.2, generator=generator)
        module.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
        module.running_var.uniform_(0.5, 1.5, generator=generator)
      elif isinstance(module, nn.Linear):
        module.weight.normal_(0, 2 / module.in_features**0.5, generator=generator)
        module.bias.normal_(0, 0.5, generator=generator)
  return model.eval()


def state_dict_numpy(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def normalize(grey_uint8):
  """uint8 [N, H, W, 1] grey -> float32 [N, 3, H, W], normalised as torchvision does."""
  x = np.asarray(grey_uint8, np.float32) / 255.0
  x = np.repeat(x, 3, axis=-1)
  x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
  return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)), dtype=np.float32)


def probabilities(model, grey_uint8):
  """Sigmoid outputs of `model` on uint8 grey images [N, H, W, 1]."""
  with torch.no_grad():
    return torch.sigmoid(model(torch.from_numpy(normalize(grey_uint8)))).numpy()
