"""Weight averaging of a training run (EMA, LAWA): the LR schedule and averaging change how well a model
survives quantization."""

from __future__ import annotations

from pathlib import Path


class WeightAveraging:
    """EMA or LAWA (average of the last k snapshots) of the trainable parameters, as a TrainerCallback.

    Its state is written next to each Trainer checkpoint, so a resumed run averages the same way.
    """

    FILE = "weight_averaging.safetensors"

    @classmethod
    def from_config(cls, cfg) -> WeightAveraging | None:
        """From a recipe section with `averaging`, `ema_decay`, `lawa_k`, `lawa_interval` (the qat
        section and the demo teacher's); None when it averages nothing."""
        return None if cfg.averaging == "none" else cls(cfg.averaging, cfg.ema_decay, cfg.lawa_k, cfg.lawa_interval)

    def __init__(self, mode: str, ema_decay: float = 0.999, lawa_k: int = 5, lawa_interval: int = 50):
        from transformers import TrainerCallback

        self.mode, self.decay, self.k, self.interval = mode, ema_decay, lawa_k, lawa_interval
        self.state: dict = {}
        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                outer.update(model, state.global_step)

            def on_save(self, args, state, control, **kw):
                outer.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        self.callback = _Callback()

    @staticmethod
    def _params(model):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def update(self, model, step: int) -> None:
        """Fold the current trainable parameters into the average (EMA every step; LAWA every lawa_interval
        steps)."""
        import torch
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        with torch.no_grad():
            params = self._params(model)
            if self.mode == "ema":
                if not self.state:
                    self.state = {n: p.detach().float().clone() for n, p in params.items()}
                else:  # torch's own EMA step: ema += (1 - decay) * (p - ema)
                    get_ema_multi_avg_fn(self.decay)(list(self.state.values()),
                                                     [params[n].detach().float() for n in self.state], step)
            elif self.mode == "lawa" and step % self.interval == 0:
                slot = (step // self.interval) % self.k
                for n, p in params.items():
                    self.state[f"{slot}/{n}"] = p.detach().float().cpu().clone()

    def save(self, ckpt_dir: Path) -> None:
        """Write the averaging state beside a Trainer checkpoint (safetensors)."""
        from safetensors.torch import save_file

        if self.state and ckpt_dir.is_dir():
            save_file({k: v.contiguous().cpu() for k, v in self.state.items()}, str(ckpt_dir / self.FILE))

    def load(self, ckpt_dir: str | None, device) -> None:
        """Read the averaging state a checkpoint holds (a resumed run averages the same way)."""
        from safetensors.torch import load_file

        if ckpt_dir and (Path(ckpt_dir) / self.FILE).is_file():
            self.state = {k: v.to(device) if self.mode == "ema" else v for k, v in load_file(str(Path(ckpt_dir) / self.FILE)).items()}

    def apply(self, model) -> int:
        """Copy the averaged weights into the model; returns how many snapshots were averaged."""
        import torch

        params = self._params(model)
        if not self.state:
            return 0
        with torch.no_grad():
            if self.mode == "ema":
                for n, p in params.items():
                    p.copy_(self.state[n].to(p.dtype))
                return 1
            slots = sorted({k.split("/", 1)[0] for k in self.state})
            for n, p in params.items():
                avg = sum(self.state[f"{s}/{n}"] for s in slots) / len(slots)
                p.copy_(avg.to(p.device, p.dtype))
            return len(slots)
