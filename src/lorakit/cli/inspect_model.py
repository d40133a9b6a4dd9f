"""`lorakit inspect`: a model's modules, suggested targets, and what each rank would cost."""

from __future__ import annotations

import argparse

from torch import nn

from ..config import LoraConfig
from ..constants import ALL_LINEAR, DEFAULT_TARGET_MODULES
from ..extras import import_optional
from ..inject.matching import iter_base_modules, plan_injection
from ..layers.base import module_weight
from ..layers.registry import lora_layer_class_for

RANKS = (1, 2, 4, 8, 16, 64)


def add_inspect_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect", help="Show modules, suggested targets and LoRA parameter counts per rank."
    )
    parser.add_argument("path", metavar="MODEL", help="Model folder, or hub id.")
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        metavar="NAME",
        help="Targets to count (names, one regex, or all-linear); default: the suggestion.",
    )
    parser.add_argument(
        "--max-depth", type=int, default=4, metavar="N", help="Depth of the module tree (4)."
    )


def adapter_parameters_per_rank(model: nn.Module, config: LoraConfig) -> tuple[int, int]:
    """(parameters that rank 1 adds, number of targeted modules): the count is linear in r."""
    plan = plan_injection(model, config)
    per_rank = 0
    for target in plan.targets:
        module = model.get_submodule(target.key)
        weight = module_weight(module)
        if isinstance(module, nn.Embedding):
            per_rank += weight.shape[0] + weight.shape[1]  # A (r, num) and B (dim, r)
        else:  # A (r, in·kernel) and B (out, r); Conv1D stores (in, out), same sum
            per_rank += weight[0].numel() + weight.shape[0]
    return per_rank, len(plan.targets)


def suggested_targets(model: nn.Module) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        present = {key.rsplit(".", 1)[-1] for key, _ in iter_base_modules(model)}
        return [name for name in DEFAULT_TARGET_MODULES[model_type] if name in present]
    return ALL_LINEAR


def print_tree(model: nn.Module, max_depth: int) -> None:
    print("module tree (path, type, weight shape):")
    for key, module in iter_base_modules(model):
        depth = key.count(".")
        if depth >= max_depth:
            continue
        weight = getattr(module, "weight", None)
        shape = f" {list(weight.shape)}" if isinstance(weight, nn.Parameter) else ""
        marker = " *" if lora_layer_class_for(module) is not None else ""
        print(f"{'  ' * depth}{key.rsplit('.', 1)[-1]}: {type(module).__name__}{shape}{marker}")
    print("(* = a type LoRA can wrap)")


def run_inspect(args: argparse.Namespace) -> int:
    transformers = import_optional("transformers", "transformers", "lorakit inspect")

    model = transformers.AutoModel.from_pretrained(args.path)
    print_tree(model, args.max_depth)
    suggestion = suggested_targets(model)
    print(f"\nsuggested target_modules: {suggestion}")
    targets = args.target_modules or suggestion
    if isinstance(targets, list) and targets == [ALL_LINEAR]:
        targets = ALL_LINEAR
    per_rank, count = adapter_parameters_per_rank(model, LoraConfig(target_modules=targets))
    total = sum(p.numel() for p in model.parameters())
    print(f"\nLoRA on {targets} ({count} modules), model parameters: {total:,d}")
    print(f"| {'r':>3} | {'trainable params':>16} | {'% of model':>10} |")
    print(f"|{'-' * 5}|{'-' * 18}|{'-' * 12}|")
    for rank in RANKS:
        params = per_rank * rank
        print(f"| {rank:>3} | {params:>16,d} | {100 * params / total:>9.4f}% |")
    return 0
