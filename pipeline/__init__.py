"""Character-level RNN language models on lyric corpora: one CPU core to a SLURM cluster."""

__version__ = "0.1.0"
