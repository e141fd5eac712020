"""Features: images -> embeddings -> the HDF5 cache.

``extraction`` (the ``extract`` entry point) -> ``job`` (the resolved job, its result, the reuse
rule) -> ``chunks`` (resumable rows in ``<cache>.parts/``) -> ``store`` (every cache read and
write); ``embedding`` runs a backbone over image files (also for ``predict`` and ``advise``);
``shards`` and ``torchrun`` split one extraction over processes; ``export`` writes other formats.
"""
