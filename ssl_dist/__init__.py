"""ssl-dist: distributed self-supervised pretraining of vision encoders."""

__version__ = "0.1.0"
