"""Post-training on the training engine: SFT and DPO as tasks of training/loop.py (tasks.py), their losses
(losses.py) and DPO's reference log-probabilities (reference.py). finetune_gpt.py is the entry point;
docs/POST_TRAINING.md the guide."""
