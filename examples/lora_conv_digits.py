"""LoRA on convolution layers: a CNN trained on digits 0-4 is adapted to digits 5-9.

Data: scikit-learn's `load_digits` (1,797 8x8 handwritten digits, UCI ML repository). The base
CNN is trained on digits 0-4 only; then its convolutions get LoRA adapters (plus a trainable
copy of the classifier head) trained on digits 5-9. With the adapter disabled the model is the
base model again, exactly.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

from lorakit import LoraConfig, get_peft_model


def split(images: torch.Tensor, labels: torch.Tensor, digits: range) -> tuple:
    keep = (labels >= digits.start) & (labels < digits.stop)
    x, y = images[keep], labels[keep]
    cut = int(0.8 * len(y))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def train(model: nn.Module, data: tuple, epochs: int, lr: float) -> None:
    x, y = data
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for start in range(0, len(y), 64):
            loss = nn.functional.cross_entropy(model(x[start : start + 64]), y[start : start + 64])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple) -> float:
    model.eval()
    x, y = data
    return (model(x).argmax(-1) == y).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels))
    images, labels = images[order], labels[order]
    old_train, old_test = split(images, labels, range(0, 5))
    new_train, new_test = split(images, labels, range(5, 10))
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    train(cnn, old_train, epochs=60, lr=5e-3)
    print(f"base CNN: digits 0-4 accuracy {accuracy(cnn, old_test):.3f}")
    print(f"base CNN: digits 5-9 accuracy {accuracy(cnn, new_test):.3f}")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"], modules_to_save=["6"])
    model = get_peft_model(cnn, config)
    model.print_trainable_parameters()
    train(model, new_train, epochs=60, lr=1e-2)
    print(f"LoRA adapted: digits 5-9 accuracy {accuracy(model, new_test):.3f}")
    with model.disable_adapter():
        print(f"adapter disabled: digits 0-4 accuracy {accuracy(model, old_test):.3f}")


if __name__ == "__main__":
    main()
