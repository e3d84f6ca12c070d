"""Task heads that aggregate per-slice braindino embeddings into per-volume predictions."""
