"""Training: dataset -> degrade/augment -> objective -> loop (plain PyTorch) -> ray_train (the only
module that imports Ray)."""
