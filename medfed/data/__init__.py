"""MedMNIST data loading, validation and seeded hospital partitions."""

from medfed.data.medmnist import (
    DEFAULT_DATASET,
    IMAGE_SIZES,
    MEDMNIST_FLAGS,
    SPLITS,
    DatasetError,
    MedMNISTDataset,
    load_dataset,
    resolve_dataset,
    shipped_dataset_path,
)
from medfed.data.partition import SCHEMES, PartitionError, label_histogram, partition_indices

__all__ = [
    "DEFAULT_DATASET",
    "IMAGE_SIZES",
    "MEDMNIST_FLAGS",
    "SCHEMES",
    "SPLITS",
    "DatasetError",
    "MedMNISTDataset",
    "PartitionError",
    "label_histogram",
    "load_dataset",
    "partition_indices",
    "resolve_dataset",
    "shipped_dataset_path",
]
