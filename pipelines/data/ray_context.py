"""Ray Data settings of the data stage, shared with benchmarks/dedup.py so both measure the same thing."""
from __future__ import annotations


def configure_data_context() -> None:
    """Turn off Ray Data's per-operator resource reservation for this driver.

    Why: the reservation keeps part of the cluster's CPUs for operators that are not running yet. Every
    stage here materializes before the next starts, so on 2 cores it only held MinHash to one task at a time
    ("backpressured:tasks(ResourceBudget)"): the near-dedup stage took 6.2-7.5 s with it and 3.6-4.2 s
    without it on 30k documents (docs/data.md). Object-store backpressure still applies.
    """
    import ray.data

    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
