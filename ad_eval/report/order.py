"""Display names and the paper's order of rows (categories) and columns (methods), then the unknown ones.

Rows: MVTec textures then objects (the groups of ``ad_eval.datasets.CATEGORY_GROUPS``), VisA alphabetically;
then categories not in the paper, alphabetically. Columns: FastFlow, C-Flow, PatchCore, PaDiM, RD, STFPM,
CutPaste, PANDA, then other methods alphabetically.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ad_eval.datasets import CATEGORY_GROUPS, VISA_CATEGORIES

METRIC_NAMES = {"image_AUROC": "image-level AUROC", "pixel_AUROC": "pixel-level AUROC", "pixel_AUPRO": "AUPRO"}
DATASET_NAMES = {"mvtec": "MVTec", "visa": "VisA"}
METHOD_ORDER = ("fastflow", "cflow", "patchcore", "padim", "rd", "stfpm", "cutpaste", "panda")  # paper's tables
CATEGORY_ORDER = {
    "mvtec": CATEGORY_GROUPS["mvtec"]["textures"] + CATEGORY_GROUPS["mvtec"]["objects"],
    "visa": VISA_CATEGORIES,
}


def dataset_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    """Known values in ``order``, then the others alphabetically."""
    values = set(values)
    return [v for v in order if v in values] + sorted(values - set(order))


def order_categories(dataset: str, categories: Iterable[str]) -> list[str]:
    return ordered(categories, CATEGORY_ORDER.get(dataset, ()))


def order_methods(methods: Iterable[str]) -> list[str]:
    return ordered(methods, METHOD_ORDER)


def default_backbones(labels: Iterable[str]) -> list[str]:
    """All labels sorted, "ImageNet" first (the paper's "ImageNet/Fractals")."""
    return sorted(set(labels), key=lambda label: (label != "ImageNet", label))
