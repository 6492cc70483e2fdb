"""Partition definitions shared by every stage."""

import dagster as dg

from lkg_pipeline.core.data.sources import DATASETS

dataset_partitions = dg.StaticPartitionsDefinition(list(DATASETS))
