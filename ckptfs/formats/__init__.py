"""Format-aware layouts: find tensor records in torch.save zip files and safetensors files."""

from __future__ import annotations

from ckptfs.formats.layout import Record, cut, plan_records, signature
from ckptfs.formats.safetensors import safetensors_records
from ckptfs.formats.torchzip import torchzip_records

__all__ = ["Record", "cut", "plan_records", "signature", "safetensors_records", "torchzip_records"]
