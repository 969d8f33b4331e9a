"""What a run records and how runs are compared.

runlog.py         the run record and its sinks, built once
metrics.py        device-side sums reduced at log intervals; metrics.jsonl
wandb_sink.py     Weights & Biases (offline when there are no credentials)
wandb_history.py  reading a run's wandb history back; compare.py: runs side by side
progress.py       the console; flops.py: FLOPs per token and MFU
"""
