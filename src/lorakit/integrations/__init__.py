"""Other libraries working with lorakit models (transformers' `Trainer`, TRL's `SFTTrainer`, ...).

Each module imports its library only when first used, so every module here imports on a plain
install (for example `lorakit.integrations.transformers` without transformers).
"""
