"""The monitors that go through other packages: TensorBoard (torch.utils.tensorboard, which
needs the `tensorboard` package) and Weights & Biases (`wandb`; WANDB_MODE=offline writes the run
under ./wandb without touching the network). Each is imported only when its section is enabled,
and a missing package is a one-line error naming the section and the install command."""

import importlib
import os


def _require(module: str, section: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{section}.enabled: true needs the {package} package ({error}); "
            f'pip install {package} (or pip install "memfit[monitors]")'
        ) from None


class TensorboardMonitor:
    def __init__(self, config):
        _require("tensorboard", "tensorboard", "tensorboard")
        summary = _require("torch.utils.tensorboard", "tensorboard", "tensorboard")
        self.log_dir = os.path.join(config.output_path, config.job_name)
        self._writer = summary.SummaryWriter(log_dir=self.log_dir)

    def write_events(self, events, resumed: bool) -> None:
        for name, value, step in events:
            self._writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbMonitor:
    def __init__(self, config):
        self._wandb = _require("wandb", "wandb", "wandb")
        self._run = self._wandb.init(project=config.project, group=config.group, entity=config.team)

    def write_events(self, events, resumed: bool) -> None:
        by_step: dict[int, dict] = {}
        for name, value, step in events:
            by_step.setdefault(step, {})[name] = value
        for step, values in sorted(by_step.items()):
            self._run.log(values, step=step)

    def flush(self) -> None:
        pass  # wandb's own process writes the run as it goes

    def close(self) -> None:
        self._run.finish()
