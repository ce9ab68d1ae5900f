"""raymim: self-supervised pretraining for 3D medical images on Ray."""
__version__ = "0.1.0"
