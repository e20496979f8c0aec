"""The pipeline's stages, one module each: corpus (tokenize and pack), model (the bridge and its
hooks), worker (one shard through the model, reduced on the device), topk, reduce (merge shards),
index (Parquet tables). ``jobs`` drives them; they read and write through ``storage``."""
