"""Dataset audits: structure, overlap with training, exact byte counts, claims checked against a dataset, fingerprints."""
