"""Data tools: the shard format (shards.py), atomic writes and sha256 of files (files.py), local corpus preparation
(prepare_corpus.py), FineWeb download (download_fineweb.py). train_gpt.py has its own shard reader, load_shard."""
