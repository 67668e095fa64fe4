"""`make bench`: the performance targets of docs/api.md §7, against ceilings of the same run."""
