"""Everything about data. The record's part: loader.py (the shard format and its one reader, the document stream and
loader, the validation set, bytes per token) and files.py (atomic writes, sha256). The tools: shards.py (writing
shards), prepare_corpus.py (a local corpus to tokenizer and shards), download_fineweb.py (FineWeb from the hub)."""
