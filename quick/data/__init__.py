"""Offline data: the Wikipedia corpus (calibration / held-out split) and the data-package installer."""

from quick.data.corpus import (
    DATA_PACKAGES,
    DataError,
    calibration_samples,
    ensure_data_packages,
    load_eval_text,
    load_texts,
    split_of,
)

__all__ = [
    "DATA_PACKAGES",
    "DataError",
    "calibration_samples",
    "ensure_data_packages",
    "load_eval_text",
    "load_texts",
    "split_of",
]
