"""Frozen encoders: export a training checkpoint as a model folder, load any encoder behind one interface."""

from braindino.encoder.encoder import Encoder
from braindino.encoder.load import load_encoder
from braindino.encoder.volume import VolumeEmbedding

__all__ = ["Encoder", "VolumeEmbedding", "load_encoder"]
