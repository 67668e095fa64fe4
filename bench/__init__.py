"""`make bench`: the performance targets of SPEC §7, measured against ceilings of the same run."""
