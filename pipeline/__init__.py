"""Data plane: shards in object storage -> Ray -> bitstreams + Parquet manifests, and back.

    storage    fsspec locations: shard listing, atomic writes, credential redaction
    shards     webdataset tar reading/writing, samples grouped by key
    manifest   the archive layout and its Parquet schemas
    stages     decode / encode / commit work, Ray-free
    compress   the Ray orchestration behind jobs.compress_bucket
    archive    reading records back (byte ranges, progressive prefixes)
    loader     a PyTorch IterableDataset decoding on demand
    samples    demo shards from matplotlib's sample photos

Codecs are used only through model's Codec interface.
"""
