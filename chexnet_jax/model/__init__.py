"""The network and what goes in and out of it: DenseNet in Flax (densenet), the
on-device normalisation (preprocessing), the loss and probabilities (losses), and
pretrained weights: torchvision/CheXNet/Keras files (weights, torch_pickle) and
the ImageNet download (imagenet_weights); and the way out: a state dict as an
ONNX graph (onnx_graph).

May import: chexnet_jax.errors, configs, input_pipeline, chexnet_jax.runtime.
"""
