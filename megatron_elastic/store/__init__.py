"""What a run keeps on disk, below every job that reads or writes it: the job configs, checkpoints (with their
integrity and safety checks), and opening a finished run. Imports nothing from training, importance, extraction,
evaluation or serving."""
