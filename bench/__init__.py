"""`tandem bench`: tandem against its peers on named, seeded workloads."""
