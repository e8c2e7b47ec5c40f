"""SOLVER.AMP.ENABLED on CPU.

Detectron2's ``AMPTrainer`` asserts CUDA and uses a CUDA GradScaler.  On CPU mixed
precision means bfloat16 autocast, which has fp32's exponent range and so needs no
loss scaling; :class:`CPUAMPTrainer` is that step.  ``build_train_step`` picks the step
for a model: Detectron2's SimpleTrainer / AMPTrainer, or ours for AMP on CPU (``Trainer``
and ``lazy_train_net.py`` use it).
"""

import time

import torch

from detectron2.engine import AMPTrainer, SimpleTrainer

__all__ = ["CPUAMPTrainer", "build_train_step"]


class CPUAMPTrainer(AMPTrainer):
    """AMPTrainer with ``torch.autocast("cpu", bfloat16)`` and no gradient scaling."""

    def __init__(self, model, data_loader, optimizer, precision=torch.bfloat16, **kwargs):
        kwargs.setdefault("grad_scaler", torch.amp.GradScaler("cpu", enabled=False))
        super().__init__(model, data_loader, optimizer, precision=precision, **kwargs)

    def run_step(self):
        assert self.model.training, "[CPUAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_train_step(model, data_loader, optimizer, amp=False):
    """The training step: SimpleTrainer, or with ``amp`` Detectron2's AMPTrainer for a
    CUDA model and :class:`CPUAMPTrainer` for a CPU one (``model`` may be wrapped in DDP)."""
    if not amp:
        return SimpleTrainer(model, data_loader, optimizer)
    cpu = next(model.parameters()).device.type == "cpu"
    return (CPUAMPTrainer if cpu else AMPTrainer)(model, data_loader, optimizer)
