"""Schedule-free AdamW / SGD (Defazio et al., the `schedulefree` package) with exact train/eval switching.

A schedule-free optimizer trains at one point y and evaluates at another, x, the average it maintains
(with z: y = (1 - b) z + b x). `eval()` moves the parameters to x, `train()` back to y. The loop calls
them around evaluation and checkpoint saving, so validation losses and saved weights (and therefore every
conversion to Hugging Face) are x: what the user means by "the model".

The package's eval/train pair is two floating-point lerps, not exactly inverse, so a resume from weights
saved at x would drift from the uninterrupted run. `eval()` here keeps y in the optimizer state (so it is in
the checkpoint) and `train()` restores it exactly: a resume is bit-exact.

Under ZeRO-1/2 (and bf16 there) DeepSpeed hands this optimizer its flat fp32 partitions; the switch moves those,
and the engine (training/engine.py, `eval_weights`) then refreshes the model from them with DeepSpeed's own
post-step copy and all-gather. The update is elementwise, so any partition gives the single-rank step. ZeRO-3
(partitioned parameters, another refresh) and bf16/fp16 without ZeRO are refused by `optimizer_errors`.
"""

from __future__ import annotations

import schedulefree
import torch


class _ExactSwitch:
    @torch.no_grad()
    def eval(self):
        for group in self.param_groups:
            if group["train_mode"]:
                for p in group["params"]:
                    if "z" in self.state.get(p, ()):
                        self.state[p]["y"] = p.detach().clone()
        super().eval()
        self._drop_empty_state()

    @torch.no_grad()
    def train(self):
        super().train()
        for group in self.param_groups:
            for p in group["params"]:
                y = self.state[p].pop("y", None) if p in self.state else None
                if y is not None:
                    p.copy_(y)
        self._drop_empty_state()

    def _drop_empty_state(self) -> None:
        # the package's switch reads self.state[p] (a defaultdict) before the first step, leaving empty entries;
        # under ZeRO the optimizer is then handed other tensors (flat partitions), and state_dict() would fail on
        # entries of parameters it no longer holds
        for p in [p for p, entry in self.state.items() if not entry]:
            del self.state[p]

    @property
    def in_train_mode(self) -> bool:
        return all(group["train_mode"] for group in self.param_groups)


class AdamWScheduleFree(_ExactSwitch, schedulefree.AdamWScheduleFree):
    pass


class SGDScheduleFree(_ExactSwitch, schedulefree.SGDScheduleFree):
    pass
