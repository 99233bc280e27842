"""cifar-ray: train, tune, evaluate and serve CIFAR-10 Keras models on a Ray cluster."""

__version__ = "0.1.0"
