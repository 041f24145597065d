"""Pre-training: fractal batches rendered on the device, a ResNet trained with Lightning."""
