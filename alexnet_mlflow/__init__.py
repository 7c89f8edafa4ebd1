"""AlexNet on CIFAR-10, tracked and compared in MLflow."""

__version__ = "0.1.0"
