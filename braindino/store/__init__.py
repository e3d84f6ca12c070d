"""Memory-mapped slice store: ``prepare_store`` writes one from a manifest, ``SliceStore`` reads it."""

from braindino.store.reader import SliceStore
from braindino.store.writer import PrepareReport, prepare_store

__all__ = ["PrepareReport", "SliceStore", "prepare_store"]
