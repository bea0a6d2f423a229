"""vopd_train: label-free on-policy self-distillation from the model's own crop view (Vision-OPD)."""
