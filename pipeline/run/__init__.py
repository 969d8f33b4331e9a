"""A run's files and what leaves the run: checkpoints, the run directory, export, generation.

checkpoint.py  the checkpoint format, atomic writes, loading, disk space (DiskFull)
rundir.py      one job per run directory (the lock), and the shared-folder check
generate.py    greedy and sampled generation from a prefix
export.py      the Hugging Face folder (safetensors, config.json, card), --web, --onnx
onnxstep.py    model.onnx (one step) and generation with onnxruntime
web/           the page `export --web` copies (index.html, lyrics.js)
"""
