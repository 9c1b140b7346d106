"""Data tools: shard writing (shards.py), local corpus preparation (prepare_corpus.py), FineWeb download
(download_fineweb.py). The shard reader is train_gpt.load_shard."""
