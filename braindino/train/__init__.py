"""Self-supervised pretraining on slice stores: DINOv2 (DINO + iBOT + KoLeo) and SimCLR, under torchrun."""
