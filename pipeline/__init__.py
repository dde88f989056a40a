"""Data plane: shards in object storage -> Ray -> bitstreams + Parquet manifests, and back.

    storage    fsspec locations: shard listing, atomic (streamed) writes, credential redaction
    shards     webdataset tars read as a stream (plain or compressed), samples by key, MemberError
    manifest   the archive layout and its Parquet schemas (manifest, errors)
    stages     decode / encode / commit work, Ray-free (each testable alone)
    cluster    joining Ray, actor pools, the environment every worker gets; ConfigError
    lease      one compress job at a time per output (_RUNNING, heartbeats, stale takeover)
    compress   the Ray orchestration behind jobs.compress_bucket (actors, retries, summary)
    archive    reading records back: (shard, key) records, byte ranges, progressive prefixes,
               batched decoding; the checks against _SUCCESS
    loader     a PyTorch IterableDataset: split by rank and worker, shuffled by epoch
    ray_data   read_archive (a Ray Dataset of records) and decode_records (an actor pool)
    decode     decode_archive behind jobs.decode: decoder actors, one output shard per shard
    samples    demo shards from matplotlib's sample photos

Codecs are used only through model's Codec interface. Where a change goes: a new input
format in shards; a new column in manifest (and the rows in stages); scheduling, retries
and the run summary in compress; reading in archive (then loader, ray_data, decode).
"""
