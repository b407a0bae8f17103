"""Dataset records and loaders; importing this package does not import torch."""

from esreid.data.datasets import (
    PUBLISHED_STATS,
    format_summary,
    load_custom,
    load_dataset,
    load_dukemtmc,
    load_market1501,
    load_msmt17,
    load_synthetic,
    load_vehicleid,
    load_veri776,
)
from esreid.data.records import Record, ReIDData

__all__ = [
    "PUBLISHED_STATS",
    "Record",
    "ReIDData",
    "format_summary",
    "load_custom",
    "load_dataset",
    "load_dukemtmc",
    "load_market1501",
    "load_msmt17",
    "load_synthetic",
    "load_vehicleid",
    "load_veri776",
]
