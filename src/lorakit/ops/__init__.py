"""Pure tensor functions: the math of LoRA, apart from modules, names and configs."""
