"""The data layer: text in, ids per split out, shared between ranks.

    corpus.py    load_corpus(cfg.data): picks the source, the one entry point
    textfile.py  the built-in zip and text files of any size (read whole, or in chunks)
    hf.py        Hugging Face datasets (Hub ids, local folders, streamed or not; splits)
    builder.py   the one preparation path: count, vocabulary, ids in parallel, into the cache
    idcache.py   the prepared-id cache folder, and `shared` (local rank 0 prepares)
    vocab.py     the deterministic character vocabulary
    streams.py   per-rank minibatches (consecutive, random windows, evaluation)
    shuffle.py   the seeded window order of random sampling
    common.py    what every source shares: Corpus, DataError, IGNORE, the cache folder

Imports only pipeline.config and pipeline.dist from outside.
"""
