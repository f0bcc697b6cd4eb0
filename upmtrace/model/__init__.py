"""The simulated machine: memslots, attributes, backing pools, mappings, RMP, direct map."""
