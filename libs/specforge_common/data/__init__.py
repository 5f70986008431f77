"""Dataset ingestion: chat templating with loss masks, source readers, and ``enqueue``.

``chat`` is light (no torch); ``sources`` reads JSONL / JSON-array / the packaged ShareGPT file;
``enqueue`` turns records into ``PromptTask``s on a run's prompts stream.
"""
