"""The trace format: schema, readers and writers, validation, synthetic workloads."""
